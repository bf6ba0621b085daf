"""``python -m benchmarks``: the same as ``beyondfacial bench``."""

import sys

from benchmarks.cli import main

sys.exit(main())
