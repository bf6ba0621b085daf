"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest
import torch

from bf_core.testing import add_tiny_lora, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_pipe():
    """The tiny SDXL pipeline with a random 'identity' LoRA (the DreamBooth backend's)."""
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity")
    return pipe
