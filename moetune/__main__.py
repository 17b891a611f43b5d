"""`python -m moetune ...`: the `moetune` command, also under `torchrun -m` and `accelerate launch -m`."""

import sys

from moetune.app.cli import entry

sys.exit(entry())
