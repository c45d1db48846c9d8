"""``python -m streamlens`` (also under ``torchrun``): the same as the ``streamlens`` command."""

import sys

from streamlens.cli import main

sys.exit(main())
