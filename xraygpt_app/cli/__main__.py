"""``python -m xraygpt_app.cli``: the same command line as the ``xraygpt`` script."""

import sys

from . import main

sys.exit(main())
