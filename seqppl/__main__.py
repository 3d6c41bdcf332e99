"""``python -m seqppl``: the command line."""

import sys

from seqppl.cli import main

sys.exit(main())
