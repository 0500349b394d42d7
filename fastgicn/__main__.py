"""`python -m fastgicn ...` runs the command line, so `torchrun --nproc_per_node N -m fastgicn train ...`
works."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
