"""Benchmark metrics as plugins: the protocol, and collection through the ``bf_register_metrics`` hook.

A metric is any object with:

- ``name`` (str, unique) and ``columns`` (tuple of result column names);
- ``kind``: ``"image"`` (one value per image and column) or ``"set"`` (a value per
  scenario computed from per-image features, like FID);
- for ``"image"``: ``score(sample, context) -> {column: float | None}`` (None: not
  measurable on this image, e.g. no face found; it is left out of the averages);
- for ``"set"``: ``features(sample, context) -> np.ndarray`` of shape (d,) for one image,
  and ``score_set(generated, reference) -> {column: float | None}`` from feature arrays
  (n, d) and (m, d);
- optional ``higher_is_better`` ({column: bool}) and ``labels`` ({column: table header}).

Values are reported as they are printed: similarities and fractions in percent. Models
come from ``context.models`` (a ``MetricModels``), loaded once and shared.

A third-party package registers metrics like backends, under the entry-point group
``beyondfacial``::

    from bf_core import hookimpl

    @hookimpl
    def bf_register_metrics(register):
        register(MyMetric())
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from benchmarks.metrics.models import MetricModels

__all__ = ["MetricContext", "MetricModels", "Sample", "installed_metrics"]

BUILTIN_PLUGIN_NAME = "bench-metrics"


@dataclass
class Sample:
    """One generated image and what it was made from.

    image: the PNG read back from disk (PIL, RGB). prompt: the scene prompt. identity:
    the ``BenchIdentity`` (None for FID reference images). item: the ``WorkItem``.
    """

    image: Any
    prompt: str
    identity: Any
    item: Any


@dataclass
class MetricContext:
    models: MetricModels


class MetricPluginWarning(UserWarning):
    """A metric plugin failed to register and was skipped."""


def _check_metric(metric: Any) -> None:
    kind = getattr(metric, "kind", "image")
    needed = ("name", "columns") + (("score",) if kind == "image" else ("features", "score_set"))
    missing = [a for a in needed if not hasattr(metric, a)]
    if kind not in ("image", "set") or missing:
        raise TypeError(f"metric {metric!r} is not a benchmark metric: kind must be 'image' or "
                        f"'set' (got {kind!r}); missing {missing}; see benchmarks.metrics")


def ensure_builtin_metrics(registry: Any) -> None:
    """The metrics hook known to ``registry``, and the built-in metrics plugin registered
    in-process unless an entry point already did."""
    from benchmarks import hookspecs
    from benchmarks.metrics import builtin

    registry.add_hookspecs(hookspecs)
    if not any(plugin is builtin for plugin in registry.manager.get_plugins()):
        registry.register_plugin(builtin, name=BUILTIN_PLUGIN_NAME)


def _register_checked(collected: list[Any]):
    def register(metric: Any) -> None:
        _check_metric(metric)
        collected.append(metric)
    return register


def installed_metrics(registry: Any | None = None) -> dict[str, Any]:
    """Every metric registered by a plugin, by name; a failing plugin warns and is skipped."""
    from bf_core.plugins import get_registry

    registry = registry or get_registry()
    ensure_builtin_metrics(registry)
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    per_plugin: dict[str, list[Any]] = {}

    def collector(name: str) -> dict[str, Any]:
        return {"register": _register_checked(per_plugin.setdefault(name, []))}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        called = list(registry.call_each("bf_register_metrics", per_plugin=collector))
    for warning in caught:  # a broken plugin must never stop the benchmark
        warnings.warn(f"metric plugin failed to register and was skipped: {warning.message}",
                      MetricPluginWarning, stacklevel=2)
    for name, _ in called:
        for metric in per_plugin.get(name, []):
            if metric.name in found:
                raise ValueError(f"metric {metric.name!r} is registered by both "
                                 f"{owners[metric.name]!r} and {name!r}; block one "
                                 "with BEYONDFACIAL_BLOCK_PLUGINS")
            found[metric.name], owners[metric.name] = metric, name
    return found


def select_metrics(available: dict[str, Any], names: list[str] | None) -> list[Any]:
    """The metrics named (all when None), in the order given."""
    if not names:
        return list(available.values())
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; installed: {', '.join(available)}")
    return [available[n] for n in names]
