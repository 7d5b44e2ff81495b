"""``python -m nam_trainer``: the same as ``nam-train``, the entry torchrun starts on every process
(``torchrun --nproc-per-node 8 -m nam_trainer --preset nam56r-small``)."""

import sys

from nam_trainer.cli import main

sys.exit(main())
