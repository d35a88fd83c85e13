"""``python -m mixprec``: the command line, also under torchrun (``torchrun --nproc-per-node 2 -m mixprec train ...``).

Not imported by ``import mixprec``: only running the package as a module runs the CLI.
"""

import sys

from mixprec.cli import main

if __name__ == "__main__":
    sys.exit(main())
