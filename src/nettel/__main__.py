"""``python -m nettel ...``: the ``nettel`` command, also where no script is on ``PATH``
(``nettel up`` starts its store maintenance passes this way)."""

from __future__ import annotations

import sys

from nettel.cli import main

if __name__ == "__main__":
    sys.exit(main())
