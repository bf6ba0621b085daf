"""``pipeline_fingerprint``: everything a wrapped call could leave changed on a pipeline."""

from __future__ import annotations

from typing import Any

import torch


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
