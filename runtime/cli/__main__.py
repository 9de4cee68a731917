"""`python -m corral.runtime.cli ...`: the `corral` command."""

import sys

from . import main

sys.exit(main())
