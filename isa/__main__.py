"""`python -m isa ...` and `torchrun --nproc_per_node=G -m isa train ...`."""
import sys

from isa.cli import main

if __name__ == "__main__":
    sys.exit(main())
