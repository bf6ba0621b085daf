"""beyondfacial's cross-method benchmark (source checkout only; not part of the package).

Every installed backend, with and without BeyondFacial, over identities x prompts x
seeds: the paper's metrics plus the close-up measures, resumable, on one GPU or many.
See docs/benchmark.md. Entry points: ``beyondfacial bench`` or ``python -m benchmarks``.
"""

from __future__ import annotations

#: lets ``beyondfacial bench`` tell this package from an unrelated one named ``benchmarks``
BEYONDFACIAL_BENCHMARK = True

__all__ = ["BEYONDFACIAL_BENCHMARK"]
