"""``beyondfacial backends`` and ``env`` answer from package metadata, importing nothing heavy.

Their speed is measured by benchmarks/cli_startup.py; these tests hold what makes them fast
(what is never imported) and that the answer stays the one a full load gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bf_core import inventory

REPO_ROOT = Path(__file__).parents[2]
#: what a listing must never import: the heavy libraries and every plugin module
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bf_backends",
         "bf_core.hosts.sdxl")

RUN_AND_REPORT_MODULES = f"""
import contextlib, io, json, sys
from bf_core import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = cli.main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r}))
print(json.dumps({{"code": code, "output": json.loads(out.getvalue()), "heavy": heavy}}))
"""


def run_command(*args: str, site: Path | None = None, **env: str) -> dict:
    """One command in a fresh interpreter: its exit status, its JSON, the heavy modules loaded."""
    environment = dict(os.environ, **env)
    if site is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO_ROOT)])
    result = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_MODULES, *args],
                            capture_output=True, text=True, env=environment, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def write_distribution(site: Path, name: str, plugin: str, module: str,
                       requires: tuple[str, ...] = (), source: str | None = None) -> None:
    """A minimal installed distribution with one entry point in the ``beyondfacial`` group."""
    info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    lines = "".join(f"Requires-Dist: {r}\n" for r in requires)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n{lines}")
    (info / "entry_points.txt").write_text(f"[beyondfacial]\n{plugin} = {module}\n")
    if source is not None:
        (site / f"{module}.py").write_text(source)


def test_backends_imports_no_plugin_and_no_heavy_library():
    result = run_command("backends")
    assert result["code"] == 0
    assert result["heavy"] == []
    names = {entry["name"] for entry in result["output"]}
    assert {"dreambooth", "photomaker", "ipadapter", "instantid", "pulid", "sdxl"} <= names


def test_env_imports_no_heavy_library_and_says_the_devices_are_unchecked():
    result = run_command("env")
    assert result["code"] == 0 and result["heavy"] == []
    assert result["output"]["versions"]["beyondfacial"]
    devices = result["output"]["devices"]
    assert devices["checked"] is False and devices["cuda_available"] is None


def test_backends_lists_what_loading_every_plugin_finds():
    fast = run_command("backends")["output"]
    full = run_command("backends", "--check")
    assert full["heavy"]  # the full check really loads the plugins
    loaded = {(e["name"], e["kind"], e.get("package"), e.get("version"))
              for e in full["output"] if e["status"] == "loaded"}
    # A plugin implementing neither registering hook (kind "plugin") registers nothing.
    installed = {(e["name"], e["kind"], e["package"], e["version"])
                 for e in fast if e["status"] == "installed" and e["kind"] != "plugin"}
    # The host entry of the full listing names no package: compare the hosts by name.
    assert {e[:2] for e in installed} == {e[:2] for e in loaded}
    assert {e for e in installed if e[1] == "backend"} == {e for e in loaded if e[1] == "backend"}
    assert [e for e in fast if e["status"] != "installed"] == []


def test_env_check_adds_torch_answers_and_the_file_probe_matches_torch():
    torch = pytest.importorskip("torch")
    checked = run_command("env", "--check")["output"]["devices"]
    assert checked["checked"] is True
    assert checked["cuda_available"] == torch.cuda.is_available()
    assert checked["cpu_threads"] >= 1
    build = inventory.torch_build()
    assert build == {"cuda": torch.version.cuda, "hip": torch.version.hip,
                     "xpu": getattr(torch.version, "xpu", None)}


def test_a_plugin_is_judged_from_its_metadata_and_loaded_only_with_check(tmp_path):
    imported = tmp_path / "imported"
    write_distribution(tmp_path, "raising-plugin", "raising", "raising_plugin",
                       source=f"open({str(imported)!r}, 'w').close()\n"
                              "raise RuntimeError('boom at import')\n")
    write_distribution(tmp_path, "lost-plugin", "lost", "lost_plugin_module_not_there")
    write_distribution(tmp_path, "needy-plugin", "needy", "needy_plugin",
                       requires=("beyondfacial", "no-such-distribution-xyz>=1",
                                 'also-not-there; extra == "optional"'),
                       source="")
    fast = {e["name"]: e for e in run_command("backends", site=tmp_path)["output"]}
    assert not imported.exists()  # listing imported no plugin
    assert (fast["raising"]["kind"], fast["raising"]["status"]) == ("plugin", "installed")
    assert fast["raising"]["package"] == "raising-plugin"
    assert fast["lost"]["status"] == "unavailable"
    assert "lost_plugin_module_not_there" in fast["lost"]["error"]
    assert fast["needy"]["status"] == "unavailable"
    assert fast["needy"]["missing"] == ["no-such-distribution-xyz"]  # the extra's is optional
    assert fast["needy"]["requires"]["beyondfacial"] is not None
    full = {e["name"]: e for e in run_command("backends", "--check", site=tmp_path)["output"]}
    assert imported.exists()
    assert (full["raising"]["status"], full["raising"]["hook"]) == ("failed", "import")
    assert "boom at import" in full["raising"]["error"]


def test_the_environment_switches_apply_without_loading():
    fast = {e["name"]: e for e in run_command(
        "backends", BEYONDFACIAL_BLOCK_PLUGINS="dreambooth")["output"]}
    assert fast["dreambooth"]["status"] == "blocked"
    assert "BEYONDFACIAL_BLOCK_PLUGINS" in fast["dreambooth"]["error"]
    assert fast["photomaker"]["status"] == "installed"
    only = {e["name"]: e for e in run_command(
        "backends", BEYONDFACIAL_ALLOW_PLUGINS="pulid")["output"]}
    assert only["pulid"]["status"] == "installed" and only["sdxl"]["status"] == "installed"
    assert only["photomaker"]["status"] == "blocked"


def test_a_missing_extra_is_shown_without_making_the_backend_unavailable(monkeypatch):
    real = inventory.installed_version.__wrapped__
    monkeypatch.setattr(inventory, "installed_version",
                        _uncached(lambda name: None if name == "insightface" else real(name)))
    listing = {e["name"]: e for e in inventory.backend_listing()}
    instantid = listing["instantid"]
    assert instantid["status"] == "installed" and instantid["kind"] == "backend"
    assert instantid["extras"]["faces"]["insightface"] is None
    assert instantid["extras"]["faces"]["onnxruntime"] == real("onnxruntime")


def _uncached(function):
    function.cache_clear = lambda: None
    return function


def test_finding_a_module_imports_none_of_the_packages_above_it(tmp_path, monkeypatch):
    package = tmp_path / "outer_pkg_for_find"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported the outer package')\n")
    (package / "inner" / "__init__.py").write_text("raise RuntimeError('imported inner')\n")
    (package / "inner" / "leaf.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert inventory.module_findable("outer_pkg_for_find.inner.leaf")
    assert not inventory.module_findable("outer_pkg_for_find.inner.absent")
    assert not inventory.module_findable("outer_pkg_for_find_absent.x")
    assert "outer_pkg_for_find" not in sys.modules


def test_the_hooks_a_plugin_implements_are_read_from_its_source(tmp_path, monkeypatch):
    (tmp_path / "hooks_only_read.py").write_text(
        "import bf_core\nfrom bf_core import hookimpl\n"
        "raise RuntimeError('imported')\n"
        "@hookimpl\ndef bf_register_backends(register):\n    pass\n"
        "class Plugin:\n    @bf_core.hookimpl(tryfirst=True)\n"
        "    def bf_backend_extras(self, backend):\n        return None\n"
        "def bf_register_hosts(register):  # not decorated: not a hook implementation\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = inventory.find_module_spec("hooks_only_read")
    assert inventory.implemented_hooks(spec) == ["bf_backend_extras", "bf_register_backends"]
    assert "hooks_only_read" not in sys.modules
    listing = {e["name"]: e for e in inventory.backend_listing()}
    assert "bf_register_backends" in listing["dreambooth"]["hooks"]
    assert listing["sdxl"]["kind"] == "host" and "bf_register_hosts" in listing["sdxl"]["hooks"]


def test_the_nvidia_driver_list_is_read_from_its_files(tmp_path):
    for bus, model in (("0000:3b:00.0", "NVIDIA H200"), ("0000:1a:00.0", "NVIDIA L4")):
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(f"Model: \t {model}\nIRQ: 1\n")
    assert inventory.nvidia_gpus(tmp_path) == ["NVIDIA L4", "NVIDIA H200"]  # by bus id
    assert inventory.nvidia_gpus(tmp_path / "absent") == []
