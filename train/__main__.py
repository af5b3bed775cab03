"""`python -m train ...` / `torchrun --nproc_per_node=G -m train ...`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
