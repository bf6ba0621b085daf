"""Test support shipped with the package: the tiny offline pipeline and the conformance kit.

Every backend, built-in or third-party, proves the same contract by subclassing
``BackendConformance`` in its own test suite::

    from bf_core.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend_name = "my-method"

        def make_pipeline(self):
            return build_my_tiny_pipeline()      # offline, seconds

        def identity_kwargs(self):
            return {"id_images": [my_test_image()]}

pytest then runs the checks below against it: baseline parity with the stock pipeline,
determinism, output shapes, the method on differing from the baseline, both lines merged
into one UNet call equal to one call per line (under ``batch_invariant_kernels``), and the
pipeline state restored after a call and after an exception raised inside one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bf_core.tiny import add_tiny_lora, make_scheduler, tiny_sdxl_pipeline, tiny_tokenizers

__all__ = [
    "BackendConformance",
    "add_tiny_lora",
    "batch_invariant_kernels",
    "forward_hooks_registered",
    "make_scheduler",
    "pipeline_fingerprint",
    "tiny_sdxl_pipeline",
    "tiny_tokenizers",
]


def _scale_repr(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), float(value.double().sum()))
    if isinstance(value, (list, tuple)):
        return tuple(_scale_repr(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _scale_repr(v)) for k, v in value.items()))
    return value


_PROCESSOR_STATE = ("scale", "num_tokens", "id_scale", "enabled", "shortcut", "shortcut_scale")


def _module_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    from bf_core.switching import peft_tuner_layers

    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    fingerprint: dict[str, Any] = {
        "class": type(module).__name__,
        "training": module.training,
        "hooks": hooks,
        "forward_overridden": "forward" in vars(module),
        "parameters": tuple((name, tuple(p.shape), str(p.dtype), str(p.device), p.requires_grad,
                             float(p.detach().double().sum()))
                            for name, p in module.named_parameters()),
        "peft": tuple((name, bool(layer._disable_adapters),
                       tuple(getattr(layer, "active_adapters", ()) or ()),
                       _scale_repr(getattr(layer, "scaling", None)), bool(getattr(layer, "merged", False)))
                      for name, layer in peft_tuner_layers(module)),
    }
    processors = getattr(module, "attn_processors", None)
    if isinstance(processors, dict):
        fingerprint["attn_processors"] = tuple(
            (name, type(proc).__name__, id(proc),
             tuple((attr, _scale_repr(getattr(proc, attr))) for attr in _PROCESSOR_STATE
                   if hasattr(proc, attr)))
            for name, proc in processors.items())
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "encoder_hid_dim_type"):
        fingerprint["encoder_hid_dim_type"] = config.encoder_hid_dim_type
        fingerprint["encoder_hid_proj"] = id(getattr(module, "encoder_hid_proj", None))
    return fingerprint


def pipeline_fingerprint(pipe: Any) -> dict[str, Any]:
    """Everything a wrapped call could leave changed on a pipeline, as comparable values.

    Components (identity, training flag, hooks, parameter shapes/dtypes/devices/sums,
    ``requires_grad``), PEFT adapter switches and scales, attention processors (identity,
    class, scales), IP-Adapter projection state, and the scheduler's config. Take it after one
    stock call: transformers adds forward hooks to its encoders the first time they run.
    """
    fingerprint: dict[str, Any] = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            fingerprint[name] = (id(component), _module_fingerprint(component))
        elif component is not None and name == "scheduler":
            fingerprint[name] = (id(component), dict(component.config))
        else:
            fingerprint[name] = id(component)
    return fingerprint


# -- batch-invariant kernels ------------------------------------------------------------------
# A merged UNet call (both lines, 4 rows) and two separate calls (2 rows each) compute the same
# numbers, but not with the same kernels: matrix products and convolutions pick their blocking
# by batch size, and a longer masked key sequence changes attention's summation order. On a CPU
# the stock UNet alone differs by about 6e-7 between one batch-4 call and two batch-2 calls.
# Inside ``batch_invariant_kernels`` every row is computed the same way whatever batch it sits
# in, so the merged and separate paths must agree bit for bit: any difference left is a real
# leak between rows (a switch that is not exact, padding that is not neutral).

_ATEN = torch.ops.aten
_MASKED = -1e4  # diffusers turns an encoder attention mask's zeros into -10000 attention bias


def _rowwise_mm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight`` with each output row reduced on its own.

    rows: (M, K), weight: (K, N) -> (M, N). Every output element is a contiguous sum over K
    whose order depends neither on M (unlike a blocked matrix kernel) nor on the strides of
    ``rows`` (a batch-1 view can be transposed where the same rows of a batch are copied).
    """
    products = rows.contiguous().unsqueeze(1) * weight.t().contiguous().unsqueeze(0)
    return products.contiguous().sum(-1)


def _rowwise_bmm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(B, M, K) @ (B, K, N) -> (B, M, N), reduced per output element as in ``_rowwise_mm``."""
    products = left.contiguous().unsqueeze(2) * right.transpose(1, 2).contiguous().unsqueeze(1)
    return products.contiguous().sum(-1)


def _scaled(tensor: torch.Tensor, factor: Any) -> torch.Tensor:
    return tensor if factor == 1 else tensor * factor


def _unpadded_attention(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """CPU flash attention one batch row at a time, without that row's masked (padding) keys.

    query: (B, H, L, D); key, value: (B, H, S, D); attn_mask broadcastable to (B, H, L, S).
    A key masked for every head and query of a row is padding: dropping it is what the mask
    means, and leaves the row with the key count (and kernel) it has in an unpadded call.
    """
    query, key, value = args[:3]
    mask = kwargs.get("attn_mask")
    outputs: list[tuple[torch.Tensor, ...]] = []
    for row in range(query.shape[0]):
        row_key, row_value, row_kwargs = key[row:row + 1], value[row:row + 1], dict(kwargs)
        row_query = query[row:row + 1].contiguous()
        if mask is not None:
            row_mask = mask[row:row + 1] if mask.shape[0] > 1 else mask
            dropped = ~row_mask if row_mask.dtype == torch.bool else row_mask <= _MASKED
            keep = ~dropped.flatten(0, -2).all(dim=0)
            row_key, row_value, row_mask = row_key[:, :, keep], row_value[:, :, keep], row_mask[..., keep]
            neutral = row_mask.all() if row_mask.dtype == torch.bool else not row_mask.any()
            row_kwargs["attn_mask"] = None if neutral else row_mask
        outputs.append(func(row_query, row_key.contiguous(), row_value.contiguous(), *args[3:],
                            **row_kwargs))
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


# aten product -> its row-wise form; the "add" forms compute beta * bias + alpha * product.
_PRODUCTS = {_ATEN.mm.default: _rowwise_mm, _ATEN.bmm.default: _rowwise_bmm}
_ADDED_PRODUCTS = {_ATEN.addmm.default: _rowwise_mm, _ATEN.baddbmm.default: _rowwise_bmm}


class _BatchInvariantKernels(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            return _PRODUCTS[func](*args)
        if func in _ADDED_PRODUCTS:
            bias, left, right = args
            return (_scaled(_ADDED_PRODUCTS[func](left, right), kwargs.get("alpha", 1))
                    + _scaled(bias, kwargs.get("beta", 1)))
        if func is _ATEN.convolution.default:
            # One image per call: the kernel (and its blocking) is the same in every batch.
            images = args[0]
            return torch.cat([func(images[i:i + 1].contiguous(), *args[1:], **kwargs)
                              for i in range(images.shape[0])])
        if func is _ATEN._scaled_dot_product_flash_attention_for_cpu.default:
            return _unpadded_attention(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant_kernels() -> Iterator[None]:
    """Run every matrix product, convolution and CPU attention so each row's result does not
    depend on the batch it is in, nor on padding keys masked out of it.

    For tests on a CPU in float32: inside it, both lines merged into one UNet call equal one
    call per line bit for bit (``BackendConformance.test_merged_lines_equal_separate_lines``).
    Slower than the stock kernels and numerically a little different from them; never used
    for generation.
    """
    with _BatchInvariantKernels():
        yield


@contextlib.contextmanager
def forward_hooks_registered() -> Iterator[list[torch.nn.Module]]:
    """Collect every module a forward hook is registered on inside the block, in order.

    For checking per-step costs: a switch that hooks hundreds of layers must do it once per
    call, not at every step. (transformers hooks its encoders the first time they run;
    filter the list to the modules you care about.)
    """
    registered: list[torch.nn.Module] = []
    register = torch.nn.Module.register_forward_hook

    def recording(module, *args, **kwargs):
        registered.append(module)
        return register(module, *args, **kwargs)

    torch.nn.Module.register_forward_hook = recording
    try:
        yield registered
    finally:
        torch.nn.Module.register_forward_hook = register


class _Abort(RuntimeError):
    """Raised by the conformance kit's callback to interrupt a call mid-loop."""


class BackendConformance:
    """Checks every backend must pass; subclass in a pytest module (see module docstring).

    Subclasses set ``backend_name`` and implement ``make_pipeline`` (a fresh tiny pipeline
    the backend recognises) and ``identity_kwargs`` (extra call keywords: ``id_images``,
    ``id_prompt``, backend options). ``stock_kwargs`` gives the keywords under which the
    plain pipeline reproduces the backend's baseline (method off).
    """

    backend_name: str = ""
    #: The backend merges both lines into one UNet call per step (``supports_row_batching``).
    merges_lines: bool = False
    prompt = "a person is kneeling by a small lake, touching the water"
    steps = 6
    size = 64

    def make_pipeline(self) -> Any:
        raise NotImplementedError

    def identity_kwargs(self) -> dict[str, Any]:
        return {}

    def stock_kwargs(self) -> dict[str, Any]:
        """Keywords the stock ``pipe(...)`` needs to equal the baseline (e.g. IP-Adapter images)."""
        return {}

    def stock_call(self, pipe: Any, **kwargs: Any):
        """The stock pipeline's call the baseline must equal; override for custom pipelines."""
        return pipe(**kwargs)

    # -- helpers ------------------------------------------------------------------------------
    def common_kwargs(self, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        kwargs = dict(prompt=self.prompt, num_inference_steps=self.steps, height=self.size,
                      width=self.size, output_type="np",
                      generator=torch.Generator().manual_seed(seed))
        kwargs.update(overrides)
        return kwargs

    def wrapped(self, pipe: Any, **config_fields: Any):
        import bf_core

        return bf_core.wrap(pipe, backend=self.backend_name, config=bf_core.BFConfig(**config_fields))

    def run_wrapped(self, pipe: Any, seed: int = 0, **config_fields: Any) -> np.ndarray:
        return self.wrapped(pipe, **config_fields)(**self.common_kwargs(seed),
                                                    **self.identity_kwargs()).images

    def run_stock(self, pipe: Any, seed: int = 0) -> np.ndarray:
        return self.stock_call(pipe, **self.common_kwargs(seed), **self.stock_kwargs()).images

    # -- the checks ---------------------------------------------------------------------------
    def test_backend_recognizes_pipeline(self):
        import bf_core

        pipe = self.make_pipeline()
        assert bf_core.wrap(pipe, backend=self.backend_name).backend.name == self.backend_name

    def test_baseline_parity(self):
        pipe = self.make_pipeline()
        stock = self.run_stock(pipe)
        baseline = self.run_wrapped(pipe, enabled=False)
        np.testing.assert_array_equal(baseline, stock)

    def test_method_on_differs_from_baseline(self):
        pipe = self.make_pipeline()
        on = self.run_wrapped(pipe)
        off = self.run_wrapped(pipe, enabled=False)
        assert np.isfinite(on).all()
        assert np.abs(on - off).max() > 1e-4

    def test_deterministic_per_seed(self):
        pipe = self.make_pipeline()
        first, again = self.run_wrapped(pipe, seed=3), self.run_wrapped(pipe, seed=3)
        other = self.run_wrapped(pipe, seed=4)
        np.testing.assert_array_equal(first, again)
        assert np.abs(first - other).max() > 1e-4

    def test_output_shapes(self):
        pipe = self.make_pipeline()
        bf = self.wrapped(pipe)
        out = bf(**self.common_kwargs(num_images_per_prompt=2), **self.identity_kwargs(),
                 return_fusion_maps=True)
        assert out.images.shape == (2, self.size, self.size, 3)
        latent = self.size // pipe.vae_scale_factor
        assert out.fusion_maps.dtype == torch.bool
        assert tuple(out.fusion_maps.shape[1:]) == (2, 1, latent, latent)
        pil = bf(**self.common_kwargs(output_type="pil"), **self.identity_kwargs()).images
        assert len(pil) == 1 and pil[0].size == (self.size, self.size)

    def test_merged_lines_equal_separate_lines(self):
        """Both lines in one UNet call per step equal one call per line, bit for bit, once the
        kernels no longer depend on the batch size (see ``batch_invariant_kernels``)."""
        pipe = self.make_pipeline()
        with batch_invariant_kernels():
            separate = self.wrapped(pipe, batch_lines=False)(
                **self.common_kwargs(output_type="latent"), **self.identity_kwargs())
            merged = self.wrapped(pipe, batch_lines=True)(
                **self.common_kwargs(output_type="latent"), **self.identity_kwargs())
        assert merged.diagnostics["unet_rows"] == separate.diagnostics["unet_rows"]
        assert separate.diagnostics["unet_calls"] > self.steps  # the ID line really ran
        if self.merges_lines:
            assert merged.diagnostics["unet_calls"] == self.steps  # one call per step
        assert torch.equal(merged.images, separate.images)

    def test_state_restored_after_call(self):
        pipe = self.make_pipeline()
        before_images = self.run_stock(pipe)
        before = pipeline_fingerprint(pipe)
        self.run_wrapped(pipe)
        assert pipeline_fingerprint(pipe) == before
        np.testing.assert_array_equal(self.run_stock(pipe), before_images)

    def test_state_restored_after_exception(self):
        pipe = self.make_pipeline()
        before_images = self.run_stock(pipe)
        before = pipeline_fingerprint(pipe)

        def abort_late(pipeline, step, timestep, tensors):
            if step >= self.steps - 2:  # after the ID line has started
                raise _Abort("forced failure inside the loop")
            return tensors

        bf = self.wrapped(pipe)
        try:
            bf(**self.common_kwargs(), **self.identity_kwargs(), callback_on_step_end=abort_late)
        except _Abort:
            pass
        else:
            raise AssertionError("the callback's exception did not propagate")
        assert pipeline_fingerprint(pipe) == before
        np.testing.assert_array_equal(self.run_stock(pipe), before_images)
