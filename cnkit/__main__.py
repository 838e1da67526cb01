"""``python -m cnkit COMMAND ...`` (and ``accelerate launch -m cnkit train ...``): the ``cnkit`` command."""

import sys

from .surfaces.cli import main

sys.exit(main())
