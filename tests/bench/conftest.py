"""The benchmark lives in the checkout's ``benchmarks/`` folder, outside the package: put the
repository root on ``sys.path`` so these tests import it as the launcher does."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
