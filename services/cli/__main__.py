"""`python -m services.cli ...`: the `influence` command."""

import sys

from . import main

sys.exit(main())
