"""`python -m fastgicn.cli ...` runs the command line, as `python -m fastgicn ...` and `fastgicn ...` do."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
