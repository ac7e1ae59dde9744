"""`python -m earlyexit`: the completion CLI (`earlyexit.cli`), as `python -m earlyexit.generate`."""

import sys

from .cli import main

sys.exit(main())
