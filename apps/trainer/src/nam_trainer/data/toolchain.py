"""The default corpus: the C++ standard library headers of the machine's C++ compiler.

The compiler itself says where they are: ``c++ -E -x c++ -v -`` prints its ``#include <...>``
search list. Of that list we keep the directories with a ``c++`` path component (libstdc++'s
``/usr/include/c++/12`` and its target directory, libc++'s ``.../include/c++/v1``) and drop
directories nested inside another kept one; the C library and compiler builtins are not C++
source and stay out.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CANDIDATES = ("c++", "g++", "clang++")
_START = "#include <...> search starts here:"
_END = "End of search list."


class ToolchainError(RuntimeError):
    """No C++ compiler, or no C++ standard library headers where it says they are."""


def find_compiler(compiler: str = "") -> str:
    """The compiler to ask: ``compiler`` if given (a name on PATH or a path), else the first candidate found."""
    names = (compiler,) if compiler else CANDIDATES
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    tried = compiler if compiler else ", ".join(CANDIDATES)
    raise ToolchainError(
        f"no C++ compiler found (tried {tried} on PATH) to locate the default corpus, the C++ standard "
        "library headers; install g++ or clang++, set data.compiler, or give data.sources"
    )


def include_dirs(compiler: str) -> list[Path]:
    """The compiler's ``#include <...>`` search directories, in its order."""
    try:
        run = subprocess.run(
            [compiler, "-E", "-x", "c++", "-v", "-"],
            input="",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ToolchainError(f"could not run {compiler} -E -x c++ -v -: {err}") from err
    lines = run.stderr.splitlines()
    if _START not in lines:
        raise ToolchainError(
            f"{compiler} -E -x c++ -v - printed no include search list (exit {run.returncode}); "
            f"stderr ends with: {run.stderr[-300:]!r}"
        )
    out = []
    for line in lines[lines.index(_START) + 1 :]:
        if line.strip() == _END:
            break
        path = line.strip().removesuffix(" (framework directory)")
        if not line.strip().endswith("(framework directory)"):
            out.append(Path(path))
    return out


def cxx_header_dirs(compiler: str = "") -> list[Path]:
    """The C++ standard library header directories of ``compiler`` (see the module docstring)."""
    exe = find_compiler(compiler)
    searched = include_dirs(exe)
    kept: list[Path] = []
    for d in searched:
        if "c++" not in d.parts or not d.is_dir():
            continue
        real = d.resolve()
        if any(real == k or k in real.parents for k in kept):
            continue
        kept = [k for k in kept if real not in k.parents]
        kept.append(real)
    if not kept:
        listed = ", ".join(map(str, searched)) or "nothing"
        raise ToolchainError(
            f"{exe} searches {listed}: none is a C++ standard library directory (a path with a 'c++' "
            "component); install the C++ standard library headers (e.g. libstdc++-dev) or give data.sources"
        )
    return kept
