"""`python -m aepo.cli ...` runs the `aepo` command."""
import sys

from aepo.cli.main import app

sys.exit(app())
