"""``python -m AIReconstructLib ...`` runs the command line (the Slicer module starts it this way)."""

import sys

from .cli import main

sys.exit(main())
