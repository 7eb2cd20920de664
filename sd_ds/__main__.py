"""``python -m sd_ds``: the ``sd-ds`` command (sd_ds.cli)."""

import sys

from sd_ds.cli import main

sys.exit(main())
