"""`python -m fastner` runs the `fastner` command."""
import sys

from fastner.cli import main

sys.exit(main())
