#!/usr/bin/env python
"""Repack LAION base64 parts into webdataset shards: the converter's command line, kept at this path for
existing scripts. The code and the help live in the package (sd_ds/convert/cli.py); the same command is
``sd-ds convert`` and ``python -m sd_ds.convert`` with the same flags. Run ``--help`` for them."""

import sys
from pathlib import Path

# run from a checkout without installing: the package beside this folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd_ds.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
