"""The plugin manager: built-in and third-party hosts and backends, loaded lazily on first use.

Built-in backends (and the SDXL host) register through the same entry-point group
(``beyondfacial``) that a third-party package uses. A plugin is isolated from the others:
one that fails to import, implements a hook no spec names, or raises in any hook is marked
failed (with the hook's name), skipped, and shown by ``beyondfacial backends``; it never
takes ``wrap`` down for everyone.

Backend names are unique. The built-in names are reserved: a third-party backend of the
same name is refused with a warning naming both distributions, as is any other collision,
unless the user chooses the winner (``BEYONDFACIAL_BACKEND_CHOICE`` or ``choose_backend``).

Environment switches:
- ``BEYONDFACIAL_BLOCK_PLUGINS=a,b``: never load these entry points.
- ``BEYONDFACIAL_ALLOW_PLUGINS=a,b``: load only these (built-in backends included only if
  listed; the built-in hosts always load, every backend needs one).
- ``BEYONDFACIAL_DISABLE_PLUGINS=1``: load no third-party plugins, only the built-ins.
- ``BEYONDFACIAL_BACKEND_CHOICE=name=distribution,...``: which distribution's backend
  serves ``name`` when several register it.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from bf_core import hookspecs
from bf_core.errors import BackendNotFoundError, UnsupportedPipelineError

BUILTIN_DISTRIBUTION = "beyondfacial"
#: module of each built-in plugin, used when the package runs from a source tree that was
#: never installed (so its entry points are not visible)
BUILTIN_PLUGINS = {
    "sdxl": "bf_core.hosts.sdxl",
    "flux": "bf_core.hosts.flux",
    "dreambooth": "bf_backends.dreambooth",
    "photomaker": "bf_backends.photomaker",
    "ipadapter": "bf_backends.ipadapter",
    "instantid": "bf_backends.instantid",
    "pulid": "bf_backends.pulid",
    "xlabs_ipadapter": "bf_backends.xlabs_ipadapter",
    "pulid_flux": "bf_backends.pulid_flux",
    "infiniteyou": "bf_backends.infiniteyou",
}
#: the built-in plugins that register hosts (base-model families), not backends
BUILTIN_HOSTS = frozenset({"sdxl", "flux"})
#: backend names only the built-in plugins may register (unless the user chooses otherwise)
RESERVED_BACKEND_NAMES = frozenset(BUILTIN_PLUGINS) - BUILTIN_HOSTS

BLOCK_ENV = "BEYONDFACIAL_BLOCK_PLUGINS"
ALLOW_ENV = "BEYONDFACIAL_ALLOW_PLUGINS"
DISABLE_ENV = "BEYONDFACIAL_DISABLE_PLUGINS"
CHOICE_ENV = "BEYONDFACIAL_BACKEND_CHOICE"

_BACKEND_ATTRIBUTES = ("name", "recognizes_description", "priority", "default_id_prompt",
                       "hosts", "options", "recognizes", "open_session")
_HOST_ATTRIBUTES = ("name", "recognizes_description", "recognizes", "call_keywords", "open_call")


class PluginLoadWarning(UserWarning):
    """A plugin failed (to load, register or answer a hook) and was skipped."""


@dataclass
class PluginRecord:
    """One plugin as ``beyondfacial backends`` reports it."""

    name: str
    source: str  # "entry point", "built-in", "in-process"
    distribution: str | None = None
    version: str | None = None
    status: str = "loaded"  # loaded | failed | blocked
    error: str | None = None
    hook: str | None = None  # the hook (or stage) in which it failed

    @property
    def builtin(self) -> bool:
        return self.source == "built-in" or self.distribution == BUILTIN_DISTRIBUTION


@dataclass
class Registered:
    """A backend or host and the plugin that registered it."""

    item: Any
    plugin: str


@dataclass
class PluginSource:
    """A plugin found, not yet loaded: its record, the module it names, how to load it."""

    record: PluginRecord
    module: str
    load: Callable[[], Any]


def plugin_sources(load_entry_points: bool = True) -> list[PluginSource]:
    """Every plugin of the entry-point group, found from metadata alone (nothing is imported).
    The built-in plugins come from ``BUILTIN_PLUGINS`` when the package runs from a source
    tree that was never installed, so its own entry points are not visible."""
    sources: list[PluginSource] = []
    found_builtin = False
    if load_entry_points:
        for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            found_builtin |= dist_name == BUILTIN_DISTRIBUTION
            if any(s.record.name == ep.name for s in sources):
                continue  # the same distribution seen twice on sys.path
            record = PluginRecord(ep.name, "entry point", dist_name,
                                  dist.version if dist is not None else None)
            sources.append(PluginSource(record, ep.module, ep.load))
    if not found_builtin:
        for name, module in BUILTIN_PLUGINS.items():
            record = PluginRecord(name, "built-in", BUILTIN_DISTRIBUTION, _own_version())
            sources.append(PluginSource(record, module,
                                        lambda m=module: importlib.import_module(m)))
    return sources


def blocked_reason(name: str, builtin: bool) -> str | None:
    """None if plugin ``name`` may load under the environment switches, else why not."""
    blocked, allowed = _env_names(BLOCK_ENV), _env_names(ALLOW_ENV)
    if blocked and name in blocked:
        return f"blocked by {BLOCK_ENV}"
    # The built-in hosts are what every backend runs on: an allow list of backends keeps them.
    if allowed is not None and name not in allowed and not (builtin and name in BUILTIN_HOSTS):
        return f"not listed in {ALLOW_ENV}"
    if not builtin and os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"third-party plugins disabled by {DISABLE_ENV}"
    return None


def _env_names(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _env_choices() -> dict[str, str]:
    """``name=distribution`` pairs of ``BEYONDFACIAL_BACKEND_CHOICE``."""
    pairs = (part.split("=", 1) for part in os.environ.get(CHOICE_ENV, "").split(",") if "=" in part)
    return {name.strip(): owner.strip() for name, owner in pairs}


def _missing_attributes(item: Any, attributes: tuple[str, ...]) -> list[str]:
    return [name for name in attributes if not hasattr(item, name)]


class PluginRegistry:
    """Holds the pluggy manager, the plugins it loaded and the hosts and backends they
    registered. Hooks are called plugin by plugin, so that one failing plugin is skipped."""

    def __init__(self, load_entry_points: bool = True, choices: dict[str, str] | None = None):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginRecord] = []
        self.choices = {**_env_choices(), **(choices or {})}
        self._backends: dict[str, Registered] = {}
        self._hosts: dict[str, Registered] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading --------------------------------------------------------------------------
    def _register_module(self, record: PluginRecord, loader: Callable[[], Any]) -> None:
        self.plugins.append(record)
        reason = blocked_reason(record.name, record.builtin)
        if reason:
            record.status, record.error = "blocked", reason
            return
        try:
            self.manager.register(loader(), name=record.name)
        except Exception as exc:  # a broken plugin must never take the host down
            self._mark_failed(record.name, exc, "import")

    def _discover(self) -> None:
        for source in plugin_sources(self._load_entry_points):
            self._register_module(source.record, source.load)

    def _add_extension_hookspecs(self) -> None:
        """Hookspec modules other packages of the project advertise (the benchmark's)."""
        if not self._load_entry_points:
            return
        for ep in metadata.entry_points(group=hookspecs.HOOKSPEC_GROUP):
            try:
                self.add_hookspecs(ep.load())
            except Exception as exc:
                warnings.warn(f"beyondfacial hookspecs {ep.value!r} failed to load: {exc}",
                              PluginLoadWarning, stacklevel=3)

    def add_hookspecs(self, module: Any) -> None:
        """Add hook specifications (once), e.g. the benchmark's ``bf_register_metrics``."""
        caller = getattr(self.manager.hook, _first_hook_name(module), None)
        if caller is None or not caller.has_spec():
            self.manager.add_hookspecs(module)

    def validate_hooks(self) -> None:
        """``check_pending``: a plugin implementing a hook no spec names (a misspelling) is
        marked failed, naming the hook, and unregistered."""
        while True:
            try:
                self.manager.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.manager.get_name(exc.plugin) or str(exc.plugin)
                self._mark_failed(name, exc, "check_pending")

    def _collect(self, only: str | None = None) -> None:
        """Hosts, then backends, from every plugin (or from plugin ``only``)."""
        for hook, adder in (("bf_register_hosts", self._host_adder),
                            ("bf_register_backends", self._backend_adder)):
            for _ in self.call_each(hook, only=only, per_plugin=adder):
                pass

    def _host_adder(self, plugin: str) -> dict[str, Any]:
        return {"register": lambda host: self.add_host(host, plugin)}

    def _backend_adder(self, plugin: str) -> dict[str, Any]:
        return {"register": lambda backend: self.add_backend(backend, plugin)}

    def ensure_loaded(self) -> PluginRegistry:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self._add_extension_hookspecs()
                self._discover()
                self.validate_hooks()
                self._collect()
        return self

    # -- calling hooks, isolated per plugin --------------------------------------------------
    def call_each(self, hook: str, *, only: str | None = None,
                  per_plugin: Callable[[str], dict[str, Any]] | None = None,
                  **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call ``hook`` one plugin at a time, in pluggy's order (the newest first), yielding
        (plugin name, its result); a plugin that raises is marked failed and skipped.
        ``only``: call that plugin alone; ``per_plugin(name)``: keywords for its call."""
        caller = getattr(self.manager.hook, hook)
        names = [impl.plugin_name for impl in reversed(caller.get_hookimpls())]
        for name in names:
            if self.manager.get_plugin(name) is None or only not in (None, name):
                continue  # unregistered by an earlier failure, or not the one asked for
            others = [p for n, p in self.manager.list_name_plugin() if n != name]
            one = self.manager.subset_hook_caller(hook, remove_plugins=others)
            try:
                result = one(**{**kwargs, **(per_plugin(name) if per_plugin else {})})
            except Exception as exc:  # never let one plugin take the call down
                self._mark_failed(name, exc, hook)
                continue
            yield name, result

    def _mark_failed(self, plugin_name: str, exc: BaseException, hook: str) -> None:
        error = f"{type(exc).__name__}: {exc}"
        record = next((p for p in self.plugins if p.name == plugin_name), None)
        if record is None:
            record = PluginRecord(plugin_name, "in-process")
            self.plugins.append(record)
        record.status, record.error, record.hook = "failed", error, hook
        if self.manager.get_plugin(plugin_name) is not None:
            self.manager.unregister(name=plugin_name)
        self._backends = {k: v for k, v in self._backends.items() if v.plugin != plugin_name}
        self._hosts = {k: v for k, v in self._hosts.items() if v.plugin != plugin_name}
        warnings.warn(f"beyondfacial plugin {plugin_name!r} failed in {hook} and was skipped: "
                      f"{error}", PluginLoadWarning, stacklevel=4)

    # -- in-process registration ------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object in this process (tests, notebooks). Returns its name."""
        self.ensure_loaded()
        name = self.manager.register(plugin, name=name)
        self.plugins.append(PluginRecord(name, "in-process"))
        self.validate_hooks()
        if self.manager.get_plugin(name) is not None:  # else refused, and recorded as failed
            self._collect(only=name)
        return name

    def unregister_plugin(self, name: str) -> None:
        """Undo ``register_plugin``: the plugin and everything it registered go away."""
        if self.manager.get_plugin(name) is not None:
            self.manager.unregister(name=name)
        self.plugins = [p for p in self.plugins if p.name != name]
        self._backends = {k: v for k, v in self._backends.items() if v.plugin != name}
        self._hosts = {k: v for k, v in self._hosts.items() if v.plugin != name}

    def _record(self, plugin: str) -> PluginRecord | None:
        return next((p for p in self.plugins if p.name == plugin), None)

    def _owner(self, plugin: str) -> str:
        """The distribution (or plugin name) that owns ``plugin``, for messages and choices."""
        record = self._record(plugin)
        return (record.distribution if record and record.distribution else plugin)

    def add_host(self, host: Any, plugin: str) -> None:
        missing = _missing_attributes(host, _HOST_ATTRIBUTES)
        if missing:
            raise TypeError(f"host {host!r} has no {missing}; see bf_core.hosts.Host")
        if host.name in self._hosts:
            other = self._hosts[host.name].plugin
            raise ValueError(f"host name {host.name!r} is registered by both {other!r} and "
                             f"{plugin!r}; block one with {BLOCK_ENV}")
        self._hosts[host.name] = Registered(host, plugin)

    def add_backend(self, backend: Any, plugin: str) -> None:
        """Register ``backend``; a name collision keeps the chosen (else built-in, else first)
        one and warns, naming both distributions."""
        missing = _missing_attributes(backend, _BACKEND_ATTRIBUTES)
        if missing:
            raise TypeError(f"backend {backend!r} has no {missing}; see bf_core.Backend")
        if self._refused_reserved(backend.name, plugin):
            return
        new = Registered(backend, plugin)
        current = self._backends.get(backend.name)
        self._backends[backend.name] = (new if current is None
                                        else self._collision_winner(backend.name, current, new))

    def _refused_reserved(self, name: str, plugin: str) -> bool:
        record = self._record(plugin)
        if name not in RESERVED_BACKEND_NAMES or (record and record.builtin) \
                or self.choices.get(name) in (plugin, self._owner(plugin)):
            return False
        warnings.warn(f"backend name {name!r} is reserved for beyondfacial's built-in backend; "
                      f"the one from {self._owner(plugin)!r} was refused. To use it instead, "
                      f"set {CHOICE_ENV}={name}={self._owner(plugin)}", PluginLoadWarning,
                      stacklevel=4)
        return True

    def _collision_winner(self, name: str, current: Registered, new: Registered) -> Registered:
        chosen = self.choices.get(name)
        for candidate in (current, new):
            if chosen in (candidate.plugin, self._owner(candidate.plugin)):
                return candidate
        builtin = [c for c in (current, new) if (r := self._record(c.plugin)) and r.builtin]
        winner = builtin[0] if builtin else current
        loser = new if winner is current else current
        warnings.warn(f"backend name {name!r} is registered by both {self._owner(current.plugin)!r} "
                      f"and {self._owner(new.plugin)!r}; using {self._owner(winner.plugin)!r} and "
                      f"refusing the other. To choose, set "
                      f"{CHOICE_ENV}={name}={self._owner(loser.plugin)}", PluginLoadWarning,
                      stacklevel=5)
        return winner

    # -- queries ----------------------------------------------------------------------------
    def backends(self) -> dict[str, Any]:
        """Installed backends by name."""
        self.ensure_loaded()
        return {name: record.item for name, record in self._backends.items()}

    def hosts(self) -> dict[str, Any]:
        """Installed hosts by name."""
        self.ensure_loaded()
        return {name: record.item for name, record in self._hosts.items()}

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

    def host_for_pipeline(self, pipe: Any) -> Any:
        """The host family of ``pipe``."""
        for host in self.hosts().values():
            if _safe_recognizes(host, pipe, "host"):
                return host
        raise self._unsupported(pipe, "host")

    def backend_for_pipeline(self, pipe: Any, host: Any | None = None) -> Any:
        """The backend that serves ``pipe``: plugins may decide, else the best recogniser."""
        host = host or self.host_for_pipeline(pipe)
        candidates = sorted((b for b in self.backends().values()
                             if host.name in b.hosts and _safe_recognizes(b, pipe, "backend")),
                            key=lambda b: -b.priority)
        names = [b.name for b in candidates]
        for _, chosen in self.call_each("bf_backend_for_pipeline", pipe=pipe, candidates=names):
            if chosen is not None:
                return self.get_backend(chosen)
        if candidates:
            return candidates[0]
        raise self._unsupported(pipe, "backend")

    def _unsupported(self, pipe: Any, missing: str) -> UnsupportedPipelineError:
        """The error for a pipeline no host (or backend) serves: what each one recognises."""
        backends = "\n".join(f"  - {name}: {b.recognizes_description}"
                             for name, b in sorted(self.backends().items()))
        hosts = "\n".join(f"  - {name}: {h.recognizes_description}"
                          for name, h in sorted(self.hosts().items()))
        return UnsupportedPipelineError(
            f"no installed beyondfacial {missing} can serve this {type(pipe).__name__}. "
            f"Installed backends and what each recognises:\n{backends}\nBase-model families "
            f"(hosts):\n{hosts}\nPass a diffusers SDXL pipeline set up for one of these "
            "methods, or name a backend with wrap(pipe, backend=...).")

    def extras(self, name: str) -> Any | None:
        """The ``BackendExtras`` a plugin gives for backend ``name``, or None."""
        self.ensure_loaded()
        for _, extras in self.call_each("bf_backend_extras", backend=name):
            if extras is not None:
                return extras
        return None


def _first_hook_name(module: Any) -> str:
    """The name of one hook a hookspec module specifies (to add the module only once)."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return next((name for name in dir(module) if hasattr(getattr(module, name), marker)), "")


def _safe_recognizes(item: Any, pipe: Any, kind: str) -> bool:
    try:
        return bool(item.recognizes(pipe))
    except Exception as exc:
        warnings.warn(f"{kind} {item.name!r} failed while inspecting the pipeline: {exc}",
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


def loaded_registry() -> PluginRegistry | None:
    """The process-wide registry if it has loaded its plugins already, else None; never
    loads (``beyondfacial backends`` answers from it when this process has one)."""
    with _registry_lock:
        registry = _registry
    return registry if registry is not None and registry._loaded else None


def reset_registry() -> None:
    """Forget every loaded plugin; the next use loads them again (tests, changed env)."""
    global _registry
    with _registry_lock:
        _registry = None


def choose_backend(name: str, distribution: str) -> None:
    """Make ``distribution``'s backend serve ``name`` when several register it (as
    ``BEYONDFACIAL_BACKEND_CHOICE`` does); plugins load again on next use."""
    reset_registry()
    global _registry
    with _registry_lock:
        _registry = PluginRegistry(choices={name: distribution})


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object in this process; undo with ``unregister_plugin(name)``."""
    return get_registry().register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    get_registry().unregister_plugin(name)
