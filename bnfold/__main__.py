"""``python -m bnfold`` runs the command line."""

import sys

from bnfold.cli import main

sys.exit(main())
