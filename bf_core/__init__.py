"""beyondfacial: identity-preserving SDXL generation of whole people in whole scenes.

``bf_core`` implements the method once (Dual-Line Inference, IdAF, IdAP) for every
identity backend. Public names are loaded lazily, so ``import bf_core`` and the CLI's
``--help`` do not import torch.

    import bf_core
    bf = bf_core.wrap(pipe)                       # the backend is found by the plugins
    image = bf(prompt="a person hiking a ridge at dawn", id_images=[...]).images[0]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "wrap": "bf_core.wrap",
    "BeyondFacialPipeline": "bf_core.wrap",
    "BFConfig": "bf_core.config",
    "IdAFConfig": "bf_core.config",
    "IdAPConfig": "bf_core.config",
    "RefineConfig": "bf_core.config",
    "idaf": "bf_core.fusion",
    "idap_query": "bf_core.aggregation",
    "idap_aggregate": "bf_core.aggregation",
    "IdentityEncoder": "bf_core.protocols",
    "Backend": "bf_core.protocols",
    "BackendSession": "bf_core.protocols",
    "Identity": "bf_core.records",
    "Line": "bf_core.records",
    "LineConditioning": "bf_core.records",
    "Person": "bf_core.records",
    "hookimpl": "bf_core.hookspecs",
    "register_plugin": "bf_core.plugins",
    "unregister_plugin": "bf_core.plugins",
    "BeyondFacialPipelineOutput": "bf_core.records",
    "render_fusion_strip": "bf_core.visualize",
}

__all__ = [
    "BFConfig",
    "Backend",
    "BackendSession",
    "BeyondFacialPipeline",
    "BeyondFacialPipelineOutput",
    "IdAFConfig",
    "IdAPConfig",
    "Identity",
    "IdentityEncoder",
    "Line",
    "LineConditioning",
    "Person",
    "RefineConfig",
    "hookimpl",
    "idaf",
    "idap_aggregate",
    "idap_query",
    "register_plugin",
    "render_fusion_strip",
    "unregister_plugin",
    "wrap",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from bf_core.aggregation import idap_aggregate, idap_query
    from bf_core.config import BFConfig, IdAFConfig, IdAPConfig, RefineConfig
    from bf_core.fusion import idaf
    from bf_core.hookspecs import hookimpl
    from bf_core.plugins import register_plugin, unregister_plugin
    from bf_core.protocols import Backend, BackendSession, IdentityEncoder
    from bf_core.records import (
        BeyondFacialPipelineOutput,
        Identity,
        Line,
        LineConditioning,
        Person,
    )
    from bf_core.visualize import render_fusion_strip
    from bf_core.wrap import BeyondFacialPipeline, wrap


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bf_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
