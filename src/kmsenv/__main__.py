"""``python -m kmsenv`` runs the CLI."""

import sys

from kmsenv.cli import main

sys.exit(main())
