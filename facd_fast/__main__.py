"""``python -m facd_fast ...`` is the ``facd`` command."""
import sys

from .cli import main

sys.exit(main())
