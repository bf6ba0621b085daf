"""Real SDXL weights, run only where they are on disk.

Set BEYONDFACIAL_SDXL_BASE to a local diffusers SDXL folder and BEYONDFACIAL_IDENTITY_LORA
to a character LoRA (.safetensors); optionally BEYONDFACIAL_IDENTITY_PROMPT.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bf_core

BASE = os.environ.get("BEYONDFACIAL_SDXL_BASE")
LORA = os.environ.get("BEYONDFACIAL_IDENTITY_LORA")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (BASE and LORA and Path(BASE).is_dir() and Path(LORA).is_file()),
                       reason="real SDXL weights and an identity LoRA are not on disk"),
]


@pytest.fixture(scope="module")
def pipe():
    from bf_core.plugins import get_registry

    backend = get_registry().get_backend("dreambooth")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    return backend.from_pretrained(BASE, LORA, torch_dtype=dtype, device=device,
                                   local_files_only=True)


def test_real_weights_baseline_parity_and_method(pipe):
    call = dict(prompt="a person is kneeling by a small lake, touching the water", height=1024,
                width=1024, num_inference_steps=30, output_type="np")
    id_prompt = os.environ.get("BEYONDFACIAL_IDENTITY_PROMPT", "a photo of sks person")
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    bf = bf_core.wrap(pipe, backend="dreambooth")
    off = bf.with_config(enabled=False)(**call, generator=torch.Generator().manual_seed(0)).images
    on = bf(**call, id_prompt=id_prompt, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(off, stock)
    assert np.isfinite(on).all() and np.abs(on - stock).mean() > 1e-3
