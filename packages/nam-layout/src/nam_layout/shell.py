"""What every command line of the stack (nam-layout, nam-spec, nam-train) does at its edges.

A reader that stops early (``nam-layout families | head -1``) closes our stdout: the command ends
quietly with 141 (128 + SIGPIPE, what a shell reports for a program the pipe killed) instead of a
BrokenPipeError traceback. Ctrl-C outside any handler of the command's own ends with one line and
130 (128 + SIGINT). It lives here because nam-layout is the one package every CLI depends on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


def guarded(prog: str, command: Callable[[], int], interrupted: str = "interrupted") -> int:
    """``command()``'s exit code; a closed stdout gives 141, Ctrl-C the line ``prog: interrupted``
    and 130."""
    try:
        code = command()
        sys.stdout.flush()  # a pipe closed after the last print fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
