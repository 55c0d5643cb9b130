"""`python -m decoupled` runs the `decoupled` command."""

import sys

from decoupled.cli import main

sys.exit(main())
