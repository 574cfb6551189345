"""`python -m amortized_nlme` runs the command-line interface."""

import sys

from amortized_nlme.cli import main

sys.exit(main())
