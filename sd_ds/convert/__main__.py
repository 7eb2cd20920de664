"""``python -m sd_ds.convert``: the converter's command line (sd_ds.convert.cli)."""

import sys

from sd_ds.convert.cli import main

sys.exit(main(prog="python -m sd_ds.convert"))
