"""The plugin manager: built-in and third-party backends, loaded lazily on first use.

Built-in backends register through the same entry-point group (``beyondfacial``) that a
third-party package uses. A plugin that fails to import or to register is recorded and
skipped, never fatal; ``beyondfacial backends`` shows it with its error.

Environment switches (comma-separated entry-point names):
- ``BEYONDFACIAL_BLOCK_PLUGINS``: never load these.
- ``BEYONDFACIAL_ALLOW_PLUGINS``: load only these (built-ins included only if listed).
- ``BEYONDFACIAL_DISABLE_PLUGINS=1``: load no third-party plugins, only the built-ins.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from bf_core import hookspecs
from bf_core.errors import BackendNotFoundError, UnsupportedPipelineError

BUILTIN_DISTRIBUTION = "beyondfacial"
#: module of each built-in backend, used when the package runs from a source tree that was
#: never installed (so its entry points are not visible)
BUILTIN_PLUGINS = {
    "dreambooth": "bf_backends.dreambooth",
    "photomaker": "bf_backends.photomaker",
    "ipadapter": "bf_backends.ipadapter",
    "instantid": "bf_backends.instantid",
    "pulid": "bf_backends.pulid",
}

BLOCK_ENV = "BEYONDFACIAL_BLOCK_PLUGINS"
ALLOW_ENV = "BEYONDFACIAL_ALLOW_PLUGINS"
DISABLE_ENV = "BEYONDFACIAL_DISABLE_PLUGINS"


class PluginLoadWarning(UserWarning):
    """A plugin failed to load or register and was skipped."""


@dataclass
class PluginRecord:
    """One plugin as ``beyondfacial backends`` reports it."""

    name: str
    source: str  # "entry point", "built-in", "in-process"
    distribution: str | None = None
    version: str | None = None
    status: str = "loaded"  # loaded | failed | blocked
    error: str | None = None


@dataclass
class BackendRecord:
    backend: Any
    plugin: str


def _env_names(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginRegistry:
    """Holds the pluggy manager, the plugins it loaded and the backends they registered."""

    def __init__(self, load_entry_points: bool = True):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginRecord] = []
        self._backends: dict[str, BackendRecord] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading --------------------------------------------------------------------------
    def _allowed(self, name: str, builtin: bool) -> str | None:
        """None if ``name`` may load, else the reason it is blocked."""
        blocked, allowed = _env_names(BLOCK_ENV), _env_names(ALLOW_ENV)
        if blocked and name in blocked:
            return f"blocked by {BLOCK_ENV}"
        if allowed is not None and name not in allowed:
            return f"not listed in {ALLOW_ENV}"
        if not builtin and os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            return f"third-party plugins disabled by {DISABLE_ENV}"
        return None

    def _register_module(self, name: str, record: PluginRecord, loader) -> None:
        reason = self._allowed(name, record.source == "built-in"
                               or record.distribution == BUILTIN_DISTRIBUTION)
        if reason:
            record.status, record.error = "blocked", reason
            self.plugins.append(record)
            return
        try:
            plugin = loader()
            self.manager.register(plugin, name=name)
        except Exception as exc:  # a broken plugin must never take the host down
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
            warnings.warn(f"beyondfacial plugin {name!r} failed to load and was skipped: "
                          f"{record.error}", PluginLoadWarning, stacklevel=3)
        self.plugins.append(record)

    def _discover(self) -> None:
        found_builtin = False
        if self._load_entry_points:
            for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else None
                found_builtin |= dist_name == BUILTIN_DISTRIBUTION
                record = PluginRecord(ep.name, "entry point", dist_name,
                                      dist.version if dist is not None else None)
                if any(p.name == ep.name for p in self.plugins):
                    continue  # the same distribution seen twice on sys.path
                self._register_module(ep.name, record, ep.load)
        if not found_builtin:
            for name, module in BUILTIN_PLUGINS.items():
                record = PluginRecord(name, "built-in", BUILTIN_DISTRIBUTION, _own_version())
                self._register_module(name, record, lambda m=module: importlib.import_module(m))

    def _collect_backends(self) -> None:
        for impl in self.manager.hook.bf_register_backends.get_hookimpls():
            def register(backend, _plugin=impl.plugin_name):
                self.add_backend(backend, _plugin)
            try:
                impl.function(register=register)
            except Exception as exc:
                self._mark_failed(impl.plugin_name, exc)

    def _mark_failed(self, plugin_name: str, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        for record in self.plugins:
            if record.name == plugin_name:
                record.status, record.error = "failed", error
        warnings.warn(f"beyondfacial plugin {plugin_name!r} failed to register: {error}",
                      PluginLoadWarning, stacklevel=3)

    def ensure_loaded(self) -> PluginRegistry:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self._discover()
                self._collect_backends()
        return self

    # -- in-process registration ------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object in this process (tests, notebooks). Returns its name."""
        self.ensure_loaded()
        name = self.manager.register(plugin, name=name)
        self.plugins.append(PluginRecord(name, "in-process"))
        hook = getattr(plugin, "bf_register_backends", None)
        if hook is not None:
            try:
                hook(register=lambda backend: self.add_backend(backend, name))
            except Exception as exc:
                self._mark_failed(name, exc)
        return name

    def unregister_plugin(self, name: str) -> None:
        """Undo ``register_plugin``: the plugin and every backend it registered go away."""
        self.manager.unregister(name=name)
        self.plugins = [p for p in self.plugins if p.name != name]
        self._backends = {k: v for k, v in self._backends.items() if v.plugin != name}

    def add_backend(self, backend: Any, plugin: str) -> None:
        for attribute in ("name", "recognizes", "open_session"):
            if not hasattr(backend, attribute):
                raise TypeError(f"backend {backend!r} has no {attribute!r}; see bf_core.Backend")
        if backend.name in self._backends:
            other = self._backends[backend.name].plugin
            raise ValueError(f"backend name {backend.name!r} is registered by both {other!r} and "
                             f"{plugin!r}; block one with {BLOCK_ENV}")
        self._backends[backend.name] = BackendRecord(backend, plugin)

    # -- queries ----------------------------------------------------------------------------
    def backends(self) -> dict[str, Any]:
        """Installed backends by name."""
        self.ensure_loaded()
        return {name: record.backend for name, record in self._backends.items()}

    def backend_plugin(self, name: str) -> str:
        self.ensure_loaded()
        return self._backends[name].plugin

    def get_backend(self, name: str) -> Any:
        backends = self.backends()
        if name not in backends:
            raise BackendNotFoundError(
                f"no backend named {name!r}; installed: {', '.join(sorted(backends)) or 'none'}. "
                "Run `beyondfacial backends` to see plugins that failed to load.")
        return backends[name]

    def backend_for_pipeline(self, pipe: Any) -> Any:
        """The backend that serves ``pipe``: plugins may decide, else the best recogniser."""
        backends = self.backends()
        candidates = sorted((b for b in backends.values() if _safe_recognizes(b, pipe)),
                            key=lambda b: -getattr(b, "priority", 0))
        names = [b.name for b in candidates]
        chosen = self.manager.hook.bf_backend_for_pipeline(pipe=pipe, candidates=names)
        if chosen is not None:
            return self.get_backend(chosen)
        if candidates:
            return candidates[0]
        lines = [f"  - {name}: {getattr(b, 'recognizes_description', 'no description')}"
                 for name, b in sorted(backends.items())]
        raise UnsupportedPipelineError(
            f"no installed beyondfacial backend can serve a {type(pipe).__name__}. "
            "Installed backends and what each recognises:\n" + "\n".join(lines) +
            "\nPass a diffusers SDXL pipeline set up for one of these methods, or name a backend "
            "with wrap(pipe, backend=...).")


def _safe_recognizes(backend: Any, pipe: Any) -> bool:
    try:
        return bool(backend.recognizes(pipe))
    except Exception as exc:
        warnings.warn(f"backend {backend.name!r} failed while inspecting the pipeline: {exc}",
                      PluginLoadWarning, stacklevel=3)
        return False


def _own_version() -> str | None:
    try:
        return metadata.version(BUILTIN_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use (never at import time)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PluginRegistry()
    return _registry.ensure_loaded()


def reset_registry() -> None:
    """Forget every loaded plugin; the next use loads them again (tests, changed env)."""
    global _registry
    with _registry_lock:
        _registry = None


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object in this process; undo with ``unregister_plugin(name)``."""
    return get_registry().register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    get_registry().unregister_plugin(name)
