"""`python -m earlyexit.generate`: the README's command, kept as the user typed it. The CLI is `earlyexit.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
