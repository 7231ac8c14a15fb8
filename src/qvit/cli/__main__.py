"""``python -m qvit.cli``: the ``qvit`` command."""
import sys

from . import main

sys.exit(main())
