"""Allow `python -m safedig_core ...`."""
import sys

from .cli import main

sys.exit(main())
