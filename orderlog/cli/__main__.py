"""`python -m orderlog.cli ...`: the same as the `orderlog` command."""

import sys

from . import main

sys.exit(main())
