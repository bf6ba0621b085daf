"""The plugin system: entry points, the example external package, failures, switches."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bf_core
from bf_core import plugins
from bf_core.errors import BackendNotFoundError, UnsupportedPipelineError
from bf_core.testing import tiny_sdxl_pipeline

EXAMPLE_PLUGIN = Path(__file__).parents[1] / "fixtures" / "example_plugin"
REPO_ROOT = Path(__file__).parents[2]


@pytest.fixture
def fresh_registry():
    """Each test sees plugins as a new process would, and leaves no trace behind."""
    plugins.reset_registry()
    yield
    importlib.invalidate_caches()
    plugins.reset_registry()


@pytest.fixture(scope="module")
def installed_example_plugin(tmp_path_factory):
    """pip-install the example plugin package (offline, no dependencies) into a folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True, capture_output=True, text=True)
    return target


def write_fake_distribution(site: Path, name: str, entry_points: dict[str, str],
                            modules: dict[str, str]) -> None:
    """A minimal installed distribution: dist-info with entry points, plus module files."""
    info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[beyondfacial]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


def cli_backends(extra_path: Path | None = None, **env: str) -> list[dict]:
    environment = dict(os.environ, **env)
    if extra_path is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(REPO_ROOT)])
    # --check loads every plugin: these tests are about loading (plain `backends` reads
    # metadata only, tests/unit/test_cli_fast.py)
    result = subprocess.run([sys.executable, "-m", "bf_core.cli", "backends", "--check"],
                            check=True,
                            capture_output=True, text=True, env=environment)
    return json.loads(result.stdout)


def test_builtin_backends_are_listed_by_the_cli():
    listing = {entry["name"]: entry for entry in cli_backends()}
    assert listing["dreambooth"]["status"] == "loaded"
    assert listing["dreambooth"]["package"] == "beyondfacial"
    assert "StableDiffusionXLPipeline" in listing["dreambooth"]["recognizes"]


def test_pip_installed_plugin_is_discovered_through_its_entry_point(installed_example_plugin):
    listing = {entry["name"]: entry for entry in cli_backends(installed_example_plugin)}
    assert listing["described-person"]["status"] == "loaded"
    assert listing["described-person"]["package"] == "beyondfacial-example-plugin"
    assert listing["described-person"]["version"] == "0.1.0"


def test_example_plugin_gets_the_method_for_free(installed_example_plugin, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(installed_example_plugin))
    importlib.invalidate_caches()
    pipe = tiny_sdxl_pipeline()
    bf = bf_core.wrap(pipe, backend="described-person")
    call = dict(prompt="a person hiking", num_inference_steps=5, height=64, width=64,
                output_type="np")
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    off = bf.with_config(enabled=False)(**call, generator=torch.Generator().manual_seed(0)).images
    on = bf(**call, id_prompt="a woman with short red hair",
            generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(off, stock)
    assert np.abs(on.images - stock).max() > 1e-4 and on.diagnostics["model_rows"] > 10
    # Automatic choice still prefers the built-in method backend (priority -10 < 0).
    assert bf_core.wrap(pipe).backend.name == "dreambooth"


def test_example_plugin_gets_the_demo_and_the_benchmark_through_its_extras(
        installed_example_plugin, monkeypatch, fresh_registry, tmp_path):
    from benchmarks.targets import installed_target
    from bf_core import cli

    monkeypatch.syspath_prepend(str(installed_example_plugin))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "beyondfacial_example_plugin.testing", raising=False)
    assert plugins.get_registry().extras("described-person").id_prompt.startswith("a woman")
    assert "beyondfacial_example_plugin.testing" not in sys.modules  # named, not imported
    out = tmp_path / "demo"
    assert cli.main(["demo", "--backend", "described-person", "--out", str(out), "--steps", "3",
                     "--size", "64"]) == 0
    assert (out / "demo_seed0_0.png").is_file() and (out / "demo_comparison.png").is_file()
    settings = json.loads((out / "demo_settings.json").read_text())
    assert settings["backend"] == "described-person"
    assert settings["call"]["id_prompt"] == "a woman with short red hair and freckles"
    target = installed_target("described-person", tiny=True, base_model=None)
    assert target.build_pipeline(None).pipe.unet.config.addition_embed_type == "text_time"


def test_broken_plugin_is_reported_and_skipped(tmp_path, monkeypatch, fresh_registry):
    write_fake_distribution(tmp_path, "broken-plugin", {"broken": "broken_plugin_module"},
                            {"broken_plugin_module": "raise RuntimeError('boom at import')\n"})
    listing = {entry["name"]: entry for entry in cli_backends(tmp_path)}
    assert listing["broken"]["status"] == "failed"
    assert "boom at import" in listing["broken"]["error"]
    assert listing["dreambooth"]["status"] == "loaded"
    # In process: a warning, never an exception, and the built-ins still work.
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.warns(plugins.PluginLoadWarning, match="broken"):
        backends = plugins.get_registry().backends()
    assert "dreambooth" in backends


def test_plugin_whose_registration_raises_is_skipped(tmp_path, monkeypatch, fresh_registry):
    source = ("from bf_core import hookimpl\n\n@hookimpl\ndef bf_register_backends(register):\n"
              "    raise ValueError('bad registration')\n")
    write_fake_distribution(tmp_path, "bad-register", {"badreg": "bad_register_module"},
                            {"bad_register_module": source})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.warns(plugins.PluginLoadWarning, match="bad registration"):
        registry = plugins.get_registry()
    record = next(p for p in registry.plugins if p.name == "badreg")
    assert record.status == "failed" and "bad registration" in record.error
    assert "dreambooth" in registry.backends()


def test_block_and_allow_switches(installed_example_plugin):
    blocked = {e["name"]: e for e in cli_backends(BEYONDFACIAL_BLOCK_PLUGINS="dreambooth")}
    assert blocked["dreambooth"]["status"] == "blocked"
    only = {e["name"]: e for e in cli_backends(installed_example_plugin,
                                               BEYONDFACIAL_ALLOW_PLUGINS="described-person")}
    assert only["described-person"]["status"] == "loaded"
    assert only["dreambooth"]["status"] == "blocked"
    builtins_only = {e["name"]: e for e in cli_backends(installed_example_plugin,
                                                        BEYONDFACIAL_DISABLE_PLUGINS="1")}
    assert builtins_only["described-person"]["status"] == "blocked"
    assert builtins_only["dreambooth"]["status"] == "loaded"


class _AlwaysServes:
    name = "always"
    recognizes_description = "anything with a unet"
    priority = 100
    default_id_prompt = "a person"
    hosts = ("sdxl",)
    options = {}

    def recognizes(self, pipe):
        return hasattr(pipe, "unet")

    def open_session(self, call, config):
        from bf_core.hosts.sdxl import SDXLSession

        return SDXLSession(self, call, config)


class _InProcessPlugin:
    @bf_core.hookimpl
    def bf_register_backends(self, register):
        register(_AlwaysServes())


class _PrefersDreamBooth:
    @bf_core.hookimpl
    def bf_backend_for_pipeline(self, pipe, candidates):
        return "dreambooth" if "dreambooth" in candidates else None


def test_in_process_registration_priority_and_unregistration(fresh_registry):
    pipe = tiny_sdxl_pipeline()
    name = bf_core.register_plugin(_InProcessPlugin(), name="in-process-test")
    try:
        assert bf_core.wrap(pipe).backend.name == "always"  # higher priority wins
        chooser = bf_core.register_plugin(_PrefersDreamBooth(), name="chooser-test")
        try:
            assert bf_core.wrap(pipe).backend.name == "dreambooth"  # a plugin may decide
        finally:
            bf_core.unregister_plugin(chooser)
    finally:
        bf_core.unregister_plugin(name)
    assert "always" not in plugins.get_registry().backends()
    assert bf_core.wrap(pipe).backend.name == "dreambooth"


def test_duplicate_backend_names_are_refused(fresh_registry):
    class Twin(_AlwaysServes):
        name = "dreambooth"

    class TwinPlugin:
        @bf_core.hookimpl
        def bf_register_backends(self, register):
            register(Twin())

    with pytest.warns(plugins.PluginLoadWarning, match="'dreambooth' is reserved.*'twin-test'"):
        name = bf_core.register_plugin(TwinPlugin(), name="twin-test")
    try:
        assert type(plugins.get_registry().backends()["dreambooth"]).__name__ == "DreamBoothBackend"
    finally:
        bf_core.unregister_plugin(name)


def test_wrap_explains_unsupported_objects_and_unknown_names():
    with pytest.raises(UnsupportedPipelineError) as info:
        bf_core.wrap(object())
    message = str(info.value)
    assert "object" in message and "dreambooth" in message and "StableDiffusionXLPipeline" in message
    with pytest.raises(BackendNotFoundError, match="no backend named 'nope'.*dreambooth"):
        bf_core.wrap(tiny_sdxl_pipeline(), backend="nope")
    with pytest.raises(UnsupportedPipelineError, match="cannot serve"):
        bf_core.wrap(object(), backend="dreambooth")


# -- isolation: one broken plugin never takes wrap down for everyone --------------------------
class _RaisesWhenAsked:
    @bf_core.hookimpl
    def bf_backend_for_pipeline(self, pipe, candidates):
        raise RuntimeError("chooser exploded")


def test_a_plugin_raising_in_a_hook_is_marked_failed_with_the_hook_and_skipped(fresh_registry,
                                                                                capsys):
    from bf_core import cli

    pipe = tiny_sdxl_pipeline()
    name = bf_core.register_plugin(_RaisesWhenAsked(), name="raising-chooser")
    try:
        with pytest.warns(plugins.PluginLoadWarning, match="'raising-chooser' failed in "
                                                           "bf_backend_for_pipeline"):
            assert bf_core.wrap(pipe).backend.name == "dreambooth"
        record = next(p for p in plugins.get_registry().plugins if p.name == name)
        assert (record.status, record.hook) == ("failed", "bf_backend_for_pipeline")
        assert "chooser exploded" in record.error
        # Skipped from now on: no second warning, and the listing says it failed, and where.
        with warnings_as_errors():
            assert bf_core.wrap(pipe).backend.name == "dreambooth"
        assert cli.main(["backends"]) == 0
        listing = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
        assert listing[name]["status"] == "failed"
        assert listing[name]["hook"] == "bf_backend_for_pipeline"
    finally:
        bf_core.unregister_plugin(name)


class _MisspeltHook:
    @bf_core.hookimpl
    def bf_register_backend(self, register):  # the spec is bf_register_backends
        raise AssertionError("a hook no spec names must never be called")


def test_a_misspelt_hook_is_caught_by_check_pending(fresh_registry):
    with pytest.warns(plugins.PluginLoadWarning, match="failed in check_pending.*"
                                                       "bf_register_backend"):
        name = bf_core.register_plugin(_MisspeltHook(), name="misspelt")
    record = next(p for p in plugins.get_registry().plugins if p.name == name)
    assert (record.status, record.hook) == ("failed", "check_pending")
    assert plugins.get_registry().manager.get_plugin(name) is None
    assert bf_core.wrap(tiny_sdxl_pipeline()).backend.name == "dreambooth"


def _backend_module(backend_name: str, priority: int = -50) -> str:
    """A third-party plugin module registering one backend called ``backend_name``."""
    return f'''from bf_core import hookimpl
from bf_core.hosts.sdxl import SDXLSession


class Backend:
    name = {backend_name!r}
    recognizes_description = "never chosen automatically"
    priority = {priority}
    default_id_prompt = "a person"
    hosts = ("sdxl",)
    options = {{}}

    def recognizes(self, pipe):
        return False

    def open_session(self, call, config):
        return SDXLSession(self, call, config)


@hookimpl
def bf_register_backends(register):
    register(Backend())
'''


def _install_twins(site: Path, name: str) -> None:
    for dist in ("twin-a", "twin-b"):
        module = dist.replace("-", "_") + "_module"
        write_fake_distribution(site / dist, dist, {dist: module},
                                {module: _backend_module(name)})


def _registry_from(site: Path, monkeypatch, **env: str):
    for folder in sorted(site.iterdir()):
        monkeypatch.syspath_prepend(str(folder))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    importlib.invalidate_caches()
    plugins.reset_registry()
    return plugins.get_registry()


def test_a_name_collision_warns_naming_both_distributions(tmp_path, monkeypatch, fresh_registry):
    _install_twins(tmp_path, "twin")
    with pytest.warns(plugins.PluginLoadWarning) as caught:
        registry = _registry_from(tmp_path, monkeypatch)
        registry.backends()
    message = next(str(w.message) for w in caught if "registered by both" in str(w.message))
    assert "'twin-a'" in message and "'twin-b'" in message
    assert f"{plugins.CHOICE_ENV}=twin=" in message
    kept = registry.backend_plugin("twin")
    assert registry._owner(kept) in message


@pytest.mark.parametrize("chosen", ["twin-a", "twin-b"])
def test_the_user_chooses_which_distribution_serves_a_name(chosen, tmp_path, monkeypatch,
                                                           fresh_registry):
    _install_twins(tmp_path, "twin")
    registry = _registry_from(tmp_path, monkeypatch, **{plugins.CHOICE_ENV: f"twin={chosen}"})
    with warnings_as_errors():  # an explicit choice is not warned about
        assert registry._owner(registry.backend_plugin("twin")) == chosen


def test_builtin_names_are_reserved_unless_the_user_chooses(tmp_path, monkeypatch, fresh_registry):
    write_fake_distribution(tmp_path / "imposter", "imposter", {"imposter": "imposter_module"},
                            {"imposter_module": _backend_module("dreambooth", priority=1000)})
    with pytest.warns(plugins.PluginLoadWarning, match="'dreambooth' is reserved.*'imposter'"):
        registry = _registry_from(tmp_path, monkeypatch)
        assert type(registry.backends()["dreambooth"]).__name__ == "DreamBoothBackend"
    chosen = _registry_from(tmp_path, monkeypatch, **{plugins.CHOICE_ENV: "dreambooth=imposter"})
    assert chosen._owner(chosen.backend_plugin("dreambooth")) == "imposter"


class warnings_as_errors:
    """A block in which any PluginLoadWarning fails the test."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("error", plugins.PluginLoadWarning)

    def __exit__(self, *exc):
        return self._catcher.__exit__(*exc)
