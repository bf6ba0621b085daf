"""The step loop stays fast on a GPU: no graph break in a compiled UNet call, no recompiling
from one call to the next, and nothing of ours reads a tensor value on the host while the
loop runs (which on CUDA would wait for the device at every step).

Each backend gets its ID modules at the tiny pipeline's size, as in the speed benchmark.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import bf_backends
import bf_core
from benchmarks import speed
from bf_core.extras import SpeedSetup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BACKENDS = ["dreambooth", "ipadapter", "photomaker", "instantid", "pulid"]
PROJECT_FOLDERS = tuple(str(Path(module.__file__).parent) for module in (bf_core, bf_backends))
TORCH_FOLDER = str(Path(torch.__file__).parent)


def backend_setup(name: str) -> SpeedSetup:
    setup = speed.speed_setup(name, speed.tiny_pipeline("cpu", torch.float32), False, 64,
                              lora_rank=4)
    setup.pipe.set_progress_bar_config(disable=True)
    return setup


def generate(setup: SpeedSetup, name: str, steps: int = 6, **config):
    wrapper = bf_core.wrap(setup.pipe, backend=name, config=bf_core.BFConfig(**config))
    return wrapper(prompt=setup.prompt or speed.PROMPT, num_inference_steps=steps, height=64,
                   width=64,
                   output_type="latent", generator=torch.Generator().manual_seed(0),
                   **setup.identity)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", BACKENDS)
def test_compiled_unet_runs_both_lines_in_one_graph_and_compiles_once(name):
    """``fullgraph=True`` turns any graph break into an error. The "eager" compiler backend
    traces exactly what inductor would receive, without spending minutes generating code."""
    setup = backend_setup(name)
    eager = generate(setup, name)
    setup.pipe.unet = torch.compile(setup.pipe.unet, fullgraph=True, backend="eager")
    counters.clear()
    first = generate(setup, name)
    assert first.diagnostics["model_calls"] == 6  # both lines merged at every two-line step
    assert counters["graph_break"] == {}
    assert counters["stats"]["unique_graphs"] > 0  # the UNet really went through dynamo
    torch.testing.assert_close(first.images, eager.images, rtol=0, atol=1e-5)
    counters.clear()
    again = generate(setup, name)
    # Per-call state (row masks, hooks, ID tokens) must not invalidate the compiled graphs.
    assert counters["stats"]["unique_graphs"] == 0, "the second call recompiled the UNet"
    assert torch.equal(again.images, first.images)


# Operations that read a tensor's value on the host: on CUDA each waits for the device.
_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
               torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
               torch.ops.aten.unique_consecutive.default}
_MASK_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                  torch.ops.aten.index_put_.default}


def _reads_host(func, args) -> bool:
    if func in _HOST_READS:
        return True
    if func in _MASK_INDEXING:  # x[mask] sizes its output by counting the mask on the host
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in args[1] if i is not None)
    return False


class HostReadRecorder(TorchDispatchMode):
    """Records, for each host read our code (bf_core, bf_backends) asks for, how many UNet
    calls had started and where. A read is ours when the innermost frame outside torch is
    ours; reads inside diffusers (its scheduler's step, for one) are the stock pipeline's."""

    def __init__(self, unet):
        super().__init__()
        self.model_calls = 0
        self.reads: list[tuple[int, str]] = []
        self._hook = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.model_calls += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_host(func, args):
            frame = [frame for frame in traceback.extract_stack()
                     if not frame.filename.startswith(TORCH_FOLDER) and frame.filename != __file__][-1]
            if frame.filename.startswith(PROJECT_FOLDERS):
                where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                self.reads.append((self.model_calls, where))
        return func(*args, **(kwargs or {}))

    def close(self):
        self._hook.remove()


@pytest.mark.parametrize("name", BACKENDS)
def test_step_loop_never_reads_tensor_values_on_the_host(name):
    setup = backend_setup(name)
    recorder = HostReadRecorder(setup.pipe.unet)
    try:
        with recorder:
            out = generate(setup, name, steps=8)
    finally:
        recorder.close()
    total = recorder.model_calls
    assert total == out.diagnostics["model_calls"] == 8
    # Between the first UNet call and the last, nothing of ours may wait for the device.
    in_loop = [(call, where) for call, where in recorder.reads if 0 < call < total]
    assert in_loop == [], f"host reads inside the step loop (UNet call index, site): {in_loop}"
    # The recorder sees our reads: the NaN check of the lines and the final latents, once,
    # after the loop.
    after = [where for call, where in recorder.reads if call == total]
    assert len(after) == 1 and "finite.py" in after[0], after


def two_people_on_their_own_loras() -> tuple[SpeedSetup, dict]:
    """DreamBooth's set-up with a second LoRA, and a call that gives each person their own."""
    from peft import LoraConfig

    setup = backend_setup("dreambooth")
    setup.pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                adapter_name="second")
    setup.pipe.set_adapters(["identity", "second"])
    people = [bf_core.Person(id_prompt="a photo of sks woman", region=(0.0, 0.0, 0.5, 1.0)),
              bf_core.Person(id_prompt="a photo of sks man", region=(0.5, 0.0, 1.0, 1.0))]
    return setup, dict(people=people, person_adapters=["identity", "second"])


def test_a_lora_per_person_compiles_once_and_reads_nothing_on_the_host():
    setup, call = two_people_on_their_own_loras()

    def generate_people(steps=6):
        wrapper = bf_core.wrap(setup.pipe, backend="dreambooth")
        return wrapper(prompt=speed.PROMPT, num_inference_steps=steps, height=64, width=64,
                       output_type="latent", generator=torch.Generator().manual_seed(0), **call)

    recorder = HostReadRecorder(setup.pipe.unet)
    try:
        with recorder:
            eager = generate_people()
    finally:
        recorder.close()
    assert recorder.model_calls == eager.diagnostics["model_calls"] == 6
    assert [r for r in recorder.reads if 0 < r[0] < recorder.model_calls] == []
    setup.pipe.unet = torch.compile(setup.pipe.unet, fullgraph=True, backend="eager")
    counters.clear()
    first = generate_people()
    assert counters["graph_break"] == {} and counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(first.images, eager.images, rtol=0, atol=1e-5)
    counters.clear()
    generate_people()
    assert counters["stats"]["unique_graphs"] == 0, "the second call recompiled the UNet"


def test_host_read_recorder_catches_a_read_planted_in_the_loop(monkeypatch):
    import bf_core.loop

    real_evaluate = bf_core.loop.evaluate

    def evaluate_then_peek(host, session, batches, batch_lines):
        predictions = real_evaluate(host, session, batches, batch_lines)
        float(batches[0].sample.flatten()[0])  # what a stray .item() in the loop would do
        return predictions

    monkeypatch.setattr(bf_core.loop, "evaluate", evaluate_then_peek)
    setup = backend_setup("dreambooth")
    recorder = HostReadRecorder(setup.pipe.unet)
    try:
        with recorder:
            generate(setup, "dreambooth", steps=4)
    finally:
        recorder.close()
    in_loop = [where for call, where in recorder.reads if 0 < call < recorder.model_calls]
    assert len(in_loop) == 3 and all("loop.py" in where for where in in_loop)


def test_the_flux_host_compiles_once_and_reads_nothing_on_the_host():
    """DreamBooth on the tiny FLUX pipeline: both lines in one transformer call per step, no
    graph break in a full-graph compile, no recompile on the next call, no host read of
    ours inside the step loop."""
    pipe = speed.tiny_flux_pipeline("cpu", torch.float32)
    setup = speed_setup_for_flux(pipe)

    def generate_flux(steps=6):
        wrapper = bf_core.wrap(setup.pipe, backend="dreambooth")
        return wrapper(prompt=speed.PROMPT, num_inference_steps=steps, height=64, width=64,
                       output_type="latent", max_sequence_length=128,
                       generator=torch.Generator().manual_seed(0), **setup.identity)

    recorder = HostReadRecorder(setup.pipe.transformer)
    try:
        with recorder:
            eager = generate_flux()
    finally:
        recorder.close()
    assert recorder.model_calls == eager.diagnostics["model_calls"] == 6
    assert [r for r in recorder.reads if 0 < r[0] < recorder.model_calls] == []
    setup.pipe.transformer = torch.compile(setup.pipe.transformer, fullgraph=True,
                                           backend="eager")
    counters.clear()
    first = generate_flux()
    assert counters["graph_break"] == {} and counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(first.images, eager.images, rtol=0, atol=1e-5)
    counters.clear()
    generate_flux()
    assert counters["stats"]["unique_graphs"] == 0, "the second call recompiled the transformer"


def speed_setup_for_flux(pipe) -> SpeedSetup:
    setup = speed.speed_setup("dreambooth", pipe, False, 64, lora_rank=4)
    setup.pipe.set_progress_bar_config(disable=True)
    return setup
