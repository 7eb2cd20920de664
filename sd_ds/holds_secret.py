"""run.sh's check whether trainer flags carry a credential: ``python -m sd_ds.holds_secret ARG...`` exits 0 when
one does (run.sh then passes the flags through a private 0600 file instead of the launcher's printed command line),
1 when none does. A thin command over ``sd_ds.redaction.holds_secret``."""

from __future__ import annotations

import sys
from typing import Optional

from sd_ds.redaction import holds_secret


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return 0 if any(holds_secret(a) for a in args) else 1


if __name__ == "__main__":
    sys.exit(main())
