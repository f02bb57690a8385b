"""`python -m honelm` is the `honelm` command."""

import sys

from honelm.cli import main

sys.exit(main())
