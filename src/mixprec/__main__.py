"""``python -m mixprec``: the command line, also under torchrun (``torchrun --nproc-per-node 2 -m mixprec train ...``).

Not imported by ``import mixprec``: only running the package as a module runs the CLI.
"""

import os
import sys

from mixprec.cli import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run is over (its files closed, the process group destroyed) leaves
        # without the interpreter's teardown: gloo's threads, still being destroyed then, abort a process
        # now and then ("terminate called without an active exception", exit -6) after a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
