"""`python -m augsvc ...` runs the command line (`augsvc.cli`)."""

import sys

from augsvc.cli import main

if __name__ == "__main__":
    sys.exit(main())
