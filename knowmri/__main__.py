"""`python -m knowmri` runs the command line."""

import sys

from knowmri.cli import main

sys.exit(main())
