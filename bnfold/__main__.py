"""``python -m bnfold`` runs the command line."""

import sys

from bnfold.cli.app import main

sys.exit(main())
