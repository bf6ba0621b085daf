"""docs/reliability.md's table, run row by row: every bad input gets the error it names.

Each row's first cell is a key of ``CASES``: a function that gives that bad input and a
fragment the message must hold. The table and ``CASES`` must have the same rows.
"""

from __future__ import annotations

import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bf_core
from bf_core import errors, faces, plugins
from bf_core.config import BFConfig, IdAFConfig, IdAPConfig
from bf_core.images import load_images
from bf_core.testing import add_tiny_lora, tiny_sdxl_pipeline
from bf_core.testing.faults import (
    RunsCodeWhenUnpickled,
    nan_in_lora_after,
    nan_out_of,
    out_of_memory_in,
)

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "reliability.md"


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the markdown table under ``heading`` (without its header rows)."""
    section = DOC.read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


# -- the shared tiny pipeline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrapper():
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity")
    return bf_core.wrap(pipe)


def call(bf, **overrides):
    kwargs = dict(prompt="a person", num_inference_steps=4, height=64, width=64,
                  output_type="np", id_prompt="a photo of sks person")
    kwargs.update(overrides)
    return bf(**kwargs)


# -- cases needing a little set-up --------------------------------------------------------------
def malicious_pickle(tmp):
    from bf_core.checkpoints import load_state_dict_file

    marker, path = tmp / "pwned", tmp / "model.bin"
    path.write_bytes(pickle.dumps({"weight": RunsCodeWhenUnpickled(marker)}))
    try:
        load_state_dict_file(path)
    finally:
        assert not marker.exists()  # refused, and the code never ran


def truncated_safetensors(tmp):
    from safetensors.torch import save_file

    from bf_core.checkpoints import load_state_dict_file

    path = tmp / "model.safetensors"
    save_file({"weight": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    load_state_dict_file(path)


def foreign_checkpoint(tmp):
    from bf_backends.photomaker.loader import load_photomaker

    path = tmp / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}}, path)
    load_photomaker(tiny_sdxl_pipeline(), path)


def wrong_keys(tmp):
    from bf_core.checkpoints import check_state_dict

    check_state_dict({"proj.weight": torch.zeros(2, 2), "extra.bias": torch.zeros(2)},
                     {"proj.weight": (2, 2), "norm.weight": (2,)}, "a test encoder")


def unreadable_lora(tmp):
    from bf_backends.dreambooth.loader import load_identity_checkpoint

    path = tmp / "identity.safetensors"
    path.write_bytes(b"not a safetensors file")
    load_identity_checkpoint(tiny_sdxl_pipeline(), str(path))


def corrupt_image(tmp):
    path = tmp / "face.png"
    buffer = tmp / "whole.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer)
    path.write_bytes(buffer.read_bytes()[:60])
    load_images([path])


def face_analyzer(tmp, bias: float):
    from bf_core.testing.faces import make_random_insightface_pack

    pytest.importorskip("insightface")
    pytest.importorskip("onnx")
    return faces.FaceAnalyzer(root=make_random_insightface_pack(tmp, face_logit_bias=bias),
                              det_size=(128, 128))


def random_photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)


def no_face(tmp):
    face_analyzer(tmp, -12.0).embed([random_photo()])


def several_faces(tmp):
    face_analyzer(tmp, 12.0).embed([random_photo()], policy="error")


def nan_in_id_line(bf):
    with nan_in_lora_after(bf.pipe, step=1) as poison:
        call(bf, callback_on_step_end=poison)


def nan_from_vae(bf):
    with nan_out_of(bf.pipe.vae.decoder):
        call(bf)


def concurrent_refused(bf):
    refusing = bf_core.wrap(bf.pipe, concurrency="refuse")
    started, release, failure = threading.Event(), threading.Event(), []

    def hold(pipe, i, t, kwargs):
        started.set()
        release.wait(60)
        return kwargs

    def first():
        try:
            call(refusing, callback_on_step_end=hold)
        except Exception as exc:  # reported below; the test thread must not swallow it
            failure.append(exc)

    runner = threading.Thread(target=first)
    runner.start()
    assert started.wait(60)
    try:
        call(refusing)
    finally:
        release.set()
        runner.join(60)
        assert not failure, failure


def reentrant(bf):
    def call_again(pipe, i, t, kwargs):
        call(bf)
        return kwargs

    call(bf, callback_on_step_end=call_again)


def out_of_memory(bf):
    with out_of_memory_in(bf.pipe.unet):
        call(bf)


class _Raises:
    @bf_core.hookimpl
    def bf_backend_for_pipeline(self, pipe, candidates):
        raise RuntimeError("boom")


class _Misspelt:
    @bf_core.hookimpl
    def bf_register_backend(self, register):
        pass


def raising_plugin(bf):
    name = bf_core.register_plugin(_Raises(), name="table-raising")
    try:
        assert bf_core.wrap(bf.pipe).backend.name == "dreambooth"  # still works for everyone
    finally:
        bf_core.unregister_plugin(name)


def misspelt_hook(bf):
    bf_core.register_plugin(_Misspelt(), name="table-misspelt")
    bf_core.unregister_plugin("table-misspelt")


def name_collision(bf):
    registry = plugins.get_registry()

    class Twin:
        name, recognizes_description, priority = "table-twin", "nothing", 0
        default_id_prompt, hosts, options = "a person", ("sdxl",), {}
        recognizes = staticmethod(lambda pipe: False)
        open_session = staticmethod(lambda call, config: None)

    class One:
        @bf_core.hookimpl
        def bf_register_backends(self, register):
            register(Twin())

    first = registry.register_plugin(One(), name="table-dist-a")
    try:
        registry.register_plugin(One(), name="table-dist-b")
    finally:
        registry.unregister_plugin("table-dist-b")
        registry.unregister_plugin(first)


#: first cell of a row -> (what gives the bad input, a fragment of the message); ``bf`` is
#: the wrapper of a tiny pipeline, ``tmp`` a fresh folder.
CASES = {
    "`prompt=[]`": (lambda bf, tmp: call(bf, prompt=[]), "non-empty list"),
    "`prompt=123`": (lambda bf, tmp: call(bf, prompt=123), "prompt must be a string"),
    "`negative_prompt` list of another length than `prompt`": (
        lambda bf, tmp: call(bf, prompt=["a", "b"], negative_prompt=["x"]), "has 1 entries"),
    "`num_inference_steps=0`": (lambda bf, tmp: call(bf, num_inference_steps=0),
                                "num_inference_steps must be an int >= 1"),
    "`height=-64`": (lambda bf, tmp: call(bf, height=-64), "height must be an int >= 8"),
    "`width=100`": (lambda bf, tmp: call(bf, width=100), "divisible by 8"),
    "`guidance_scale=nan`": (lambda bf, tmp: call(bf, guidance_scale=float("nan")),
                             "guidance_scale must be a finite number"),
    '`output_type="jpeg"`': (lambda bf, tmp: call(bf, output_type="jpeg"), "output_type"),
    "`num_inference_step=3` (a misspelt keyword)": (
        lambda bf, tmp: call(bf, num_inference_step=3), "did you mean 'num_inference_steps'"),
    '`id_promt="..."` (a misspelt keyword)': (
        lambda bf, tmp: call(bf, id_promt="x"), "did you mean 'id_prompt'"),
    "`id_prompt=42`": (lambda bf, tmp: call(bf, id_prompt=42), "id_prompt must be a string"),
    "`id_negative_prompt` list of the wrong length": (
        lambda bf, tmp: call(bf, id_negative_prompt=["a", "b"]), "id_negative_prompt has 2"),
    '`config="fast"` (not a `BFConfig`)': (lambda bf, tmp: call(bf, config="fast"),
                                          "config must be a BFConfig"),
    "`IdAPConfig(num_tokens=10**6)`": (lambda bf, tmp: IdAPConfig(num_tokens=10**6), "<= 256"),
    "`IdAFConfig(lambda_id=1e308)`": (lambda bf, tmp: IdAFConfig(lambda_id=1e308), "<= 10000"),
    "`IdAPConfig(temperature=1e-300)`": (lambda bf, tmp: IdAPConfig(temperature=1e-300),
                                         "in [0.001, 1000]"),
    "`IdAPConfig(query_file=123)`": (lambda bf, tmp: IdAPConfig(query_file=123),
                                     "query_file must be a path"),
    "`BFConfig(idaf_start=1.5)`": (lambda bf, tmp: BFConfig(idaf_start=1.5), "[0, 1)"),
    '`wrap(pipe, concurrency="sometimes")`': (
        lambda bf, tmp: bf_core.wrap(bf.pipe, concurrency="sometimes"), "concurrency"),
    "`wrap(object())`": (lambda bf, tmp: bf_core.wrap(object()), "can serve this object"),
    '`wrap(pipe, backend="nope")`': (lambda bf, tmp: bf_core.wrap(bf.pipe, backend="nope"),
                                     "no backend named 'nope'"),
    "a reference photo of 1 x 1 pixels": (
        lambda bf, tmp: load_images([np.zeros((1, 1, 3), np.uint8)]), "1 x 1 pixels"),
    "a corrupt or truncated image file": (lambda bf, tmp: corrupt_image(tmp), "face.png"),
    "an empty `id_images` list": (
        lambda bf, tmp: load_images([]), "empty list"),
    "a reference photo with no face": (lambda bf, tmp: no_face(tmp), "reference image 0"),
    'several faces with `face_policy="error"`': (lambda bf, tmp: several_faces(tmp),
                                                 "reference image 0"),
    "a pickled checkpoint that runs code when unpickled": (lambda bf, tmp: malicious_pickle(tmp),
                                                           "weights_only=True"),
    "a truncated `.safetensors` file": (lambda bf, tmp: truncated_safetensors(tmp),
                                        "not a readable safetensors file"),
    "another method's checkpoint (an IP-Adapter file given to PhotoMaker)": (
        lambda bf, tmp: foreign_checkpoint(tmp), "looks like an IP-Adapter"),
    "unknown or missing state-dict keys": (lambda bf, tmp: wrong_keys(tmp), "missing key"),
    "a DreamBooth LoRA file diffusers cannot read": (lambda bf, tmp: unreadable_lora(tmp),
                                                     "could not load it as an SDXL LoRA"),
    "`person_adapters` naming an adapter the pipeline has not loaded": (
        lambda bf, tmp: call(bf, person_adapters=["nope"]), "which the pipeline has not loaded"),
    "`person_adapters` with another number of entries than people": (
        lambda bf, tmp: call(bf, person_adapters=["identity", "identity"]),
        "has 2 entries but the call has 1 person"),
    "`refine_boxes` without `refine_faces=True`": (
        lambda bf, tmp: call(bf, refine_boxes=[(0.4, 0.2, 0.6, 0.4)]),
        "take effect with refine_faces=True"),
    '`refine_faces=True` with `output_type="latent"`': (
        lambda bf, tmp: call(bf, refine_faces=True, output_type="latent"),
        "output_type='latent' gives none"),
    "NaN in the ID line's prediction": (lambda bf, tmp: nan_in_id_line(bf),
                                        "the ID line's prediction holds NaN"),
    "NaN out of the VAE": (lambda bf, tmp: nan_from_vae(bf), "VAE decoded NaN"),
    'a call while another thread\'s call runs, with `concurrency="refuse"`': (
        lambda bf, tmp: concurrent_refused(bf), "another call is running"),
    "a call from inside a running call on the same pipeline (a callback)": (
        lambda bf, tmp: reentrant(bf), "from inside a running call"),
    "the device runs out of memory inside a call": (lambda bf, tmp: out_of_memory(bf),
                                                    "batch_lines=False"),
    "a plugin that raises in any hook": (lambda bf, tmp: raising_plugin(bf),
                                         "failed in bf_backend_for_pipeline"),
    "a plugin implementing a misspelt hook": (lambda bf, tmp: misspelt_hook(bf),
                                              "failed in check_pending"),
    "two distributions registering one backend name": (lambda bf, tmp: name_collision(bf),
                                                       "registered by both"),
}

ROWS = table_rows("Bad input, the error, what to do")


def test_the_table_and_the_cases_have_the_same_rows():
    assert [row[0] for row in ROWS if row[0] not in CASES] == []
    assert [key for key in CASES if key not in {row[0] for row in ROWS}] == []
    assert all(len(row) == 3 and row[2] for row in ROWS)  # every row says what to do


def _named_class(cell: str) -> type:
    name = re.fullmatch(r"`(\w+)`", cell).group(1)
    for module in (errors, plugins, faces):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"no error class {name}")


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_every_bad_input_of_the_table_gets_its_error(row, wrapper, tmp_path, one_thread):
    bad_input, error_cell, _ = row
    give, fragment = CASES[bad_input]
    expected = _named_class(error_cell)
    if issubclass(expected, Warning):
        plugins.reset_registry()
        try:
            with pytest.warns(expected) as caught:
                give(wrapper, tmp_path)
        finally:
            plugins.reset_registry()
        messages = [str(w.message) for w in caught if issubclass(w.category, expected)]
        assert any(fragment in message for message in messages), messages
        return
    assert issubclass(expected, errors.BeyondFacialError)
    with pytest.raises(expected) as info:
        give(wrapper, tmp_path)
    assert fragment in str(info.value)


def test_every_guarantee_names_a_test_that_exists():
    rows = table_rows("Guarantees that hold, and the tests that hold them")
    assert len(rows) >= 8
    for _, where in rows:
        path, _, name = where.strip("`").partition("::")
        assert re.search(rf"def {name}\(", (ROOT / path).read_text()), where
