"""What is installed, answered from package metadata alone: ``beyondfacial backends`` and
``beyondfacial env`` without ``--check``.

Loading a plugin imports its backend, and a backend imports torch, diffusers and
transformers: seconds of CPU to print a list. These answers come instead from the entry
points of the ``beyondfacial`` group, the distributions' metadata (versions, requirements)
and ``importlib.util.find_spec``, and import no plugin and none of those libraries. What only
loading can tell (which backends a third-party plugin registers, their descriptions and
priorities, a plugin that raises when imported, torch's own view of the devices) comes with
``--check``, which loads everything (docs/plugins.md, "Listing without importing").
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bf_core import plugins

#: The extras of beyondfacial each built-in backend uses for some of its inputs (face
#: analysis, PuLID's face features). They are imported only when such an input is given,
#: so a missing one never stops the backend from loading; the listing shows what they hold.
BUILTIN_BACKEND_EXTRAS = {
    "photomaker": ("faces",),
    "ipadapter": ("faces",),
    "instantid": ("faces",),
    "pulid": ("pulid",),
    "pulid_flux": ("pulid",),
    "infiniteyou": ("faces",),
}
_KIND_ORDER = {"backend": 0, "host": 1, "plugin": 2}


def backend_listing() -> list[dict[str, Any]]:
    """Every plugin the entry points name, with what it requires and what of that is
    missing; backends first, then hosts, then the other plugins, each by name."""
    installed_version.cache_clear()  # one listing, one look at what is installed
    entries = [_plugin_entry(source) for source in plugins.plugin_sources()]
    return sorted(entries, key=lambda entry: (_KIND_ORDER[entry["kind"]], entry["name"]))


def _plugin_entry(source: plugins.PluginSource) -> dict[str, Any]:
    record = source.record
    entry: dict[str, Any] = {"name": record.name, "kind": "plugin", "status": "installed",
                             "plugin": record.name, "package": record.distribution,
                             "version": record.version, "module": source.module}
    reason = plugins.blocked_reason(record.name, record.builtin)
    if reason:
        return {**entry, "status": "blocked", "hook": None, "error": reason}
    requires = requirements(record.distribution)
    missing = [name for name, version in requires.items() if version is None]
    spec = find_module_spec(source.module)
    if spec is None:
        return {**entry, "status": "unavailable", "requires": requires, "missing": missing,
                "error": f"its module {source.module!r} cannot be found; reinstall "
                         f"{record.distribution or 'the package that provides it'}"}
    if missing:
        return {**entry, "status": "unavailable", "requires": requires, "missing": missing,
                "error": f"{', '.join(missing)} not installed; install "
                         f"{'it' if len(missing) == 1 else 'them'} with pip"}
    hooks = implemented_hooks(spec)
    if record.builtin:
        entry["kind"] = _builtin_kind(record.name, hooks)
    entry["hooks"] = hooks
    entry["requires"] = requires
    extras = BUILTIN_BACKEND_EXTRAS.get(record.name, ()) if record.builtin else ()
    if extras:
        entry["extras"] = {extra: requirements(record.distribution, extra) for extra in extras}
    return entry


def _builtin_kind(name: str, hooks: list[str] | None) -> str:
    """A built-in plugin registers one backend named after its entry point, or a host; one
    whose module implements neither hook (a backend still being written) is a plugin."""
    if hooks is None:  # no source to read: the names say it
        return "host" if name in plugins.BUILTIN_HOSTS else "backend"
    if "bf_register_hosts" in hooks:
        return "host"
    return "backend" if "bf_register_backends" in hooks else "plugin"


def implemented_hooks(spec: importlib.machinery.ModuleSpec) -> list[str] | None:
    """The hook implementations (functions decorated ``hookimpl``) in a module's source,
    read from its file, not imported; None when it has no Python source to read."""
    origin = spec.origin or ""
    if not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    return sorted({node.name for node in ast.walk(tree)
                   if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                   and any(_is_hookimpl(d) for d in node.decorator_list)})


def _is_hookimpl(decorator: ast.expr) -> bool:
    """``@hookimpl``, ``@bf_core.hookimpl`` or ``@hookimpl(tryfirst=True)``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "hookimpl"


# -- requirements and modules, found without importing them ---------------------------------
def requirements(distribution: str | None, extra: str | None = None) -> dict[str, str | None]:
    """The packages ``distribution`` requires (with ``extra``: those that extra adds), each
    with its installed version, or None where it is not installed or cannot be imported."""
    if distribution is None:
        return {}
    try:
        lines = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return {}  # a source tree that was never installed: nothing is declared
    found: dict[str, str | None] = {}
    for line in lines:
        name, applies = _requirement(line)
        if applies(extra or "") and (extra is None or not applies("")):
            found.setdefault(name, installed_version(name))
    return found


def _requirement(line: str):
    """The name of one ``Requires-Dist`` line, and whether it applies for a given extra."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers; without it, read the line itself
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1)
        wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        return name, lambda extra: (wanted.group(1) == extra) if wanted else True
    requirement = Requirement(line)
    marker = requirement.marker
    return requirement.name, lambda extra: marker is None or marker.evaluate({"extra": extra})


@functools.cache
def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` if one of its top-level modules can be
    found (metadata left behind by a half-removed package does not count), else None."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    modules = _top_level_modules(dist)
    if modules and not any(find_module_spec(name) for name in modules):
        return None
    return dist.version


def _top_level_modules(dist: metadata.Distribution) -> list[str]:
    listed = dist.read_text("top_level.txt")
    if listed:
        return listed.split()
    names = set()
    for path in dist.files or ():
        top = path.parts[0]
        if top in ("..", "__pycache__") or top.endswith((".dist-info", ".data", ".pth")):
            continue
        if len(path.parts) > 1 or path.suffix in (".py", ".so", ".pyd"):
            names.add(top.split(".")[0])
    return sorted(names)


def find_module_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of module ``name``, found without importing it or any package above it
    (``importlib.util.find_spec("a.b")`` would import ``a``, which may import torch)."""
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        return loaded.__spec__
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for depth in range(2, len(parts) + 1):
            if spec is None or spec.submodule_search_locations is None:
                return None
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]),
                                                            spec.submodule_search_locations)
    except (ImportError, ValueError):
        return None
    return spec


def module_findable(name: str) -> bool:
    """Whether module ``name`` can be imported, as far as finding it tells (nothing runs)."""
    return find_module_spec(name) is not None


# -- devices, without importing torch ---------------------------------------------------------
def device_probe() -> dict[str, Any]:
    """The devices as far as files tell: the installed torch's build (its CUDA, ROCm or XPU
    version, read from ``torch/version.py``), the GPUs the NVIDIA driver lists, the CPU
    count. torch's own answers (``cuda_available``, ...) stay None: ``env --check``."""
    return {"checked": False, "torch_build": torch_build(), "nvidia_gpus": nvidia_gpus(),
            "cpu_count": os.cpu_count(), "cuda_available": None, "cuda": None,
            "mps_available": None, "cpu_threads": None}


def torch_build() -> dict[str, str | None] | None:
    """``torch.version``'s ``cuda``, ``hip`` and ``xpu``, read from the file (None when torch
    is not installed or the file says something else)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    values: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
            values[target.id] = node.value.value
    return {key: values.get(key) for key in ("cuda", "hip", "xpu")}


def nvidia_gpus(root: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    """The model of each GPU the NVIDIA driver lists (Linux; empty elsewhere)."""
    models = []
    for info in sorted(root.glob("*/information")) if root.is_dir() else ():
        try:
            text = info.read_text()
        except OSError:
            continue
        match = re.search(r"^Model:\s*(.+)$", text, re.M)
        if match:
            models.append(match.group(1).strip())
    return models
