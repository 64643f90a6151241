"""``python -m normkit`` is the ``normkit`` command."""

import sys

from normkit.cli import main

sys.exit(main())
