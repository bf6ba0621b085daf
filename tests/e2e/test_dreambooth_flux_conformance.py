"""The conformance kit run against the DreamBooth backend on the tiny FLUX.1 pipeline (a
character LoRA on the transformer and CLIP), with distilled guidance and with true CFG."""

from bf_core.testing import BackendConformance
from bf_core.testing.tiny_flux import add_tiny_flux_lora, tiny_flux_pipeline

# T5 padded to 64 tokens, not 512: the same code paths, a faster suite
SHORT_TEXT = {"max_sequence_length": 64}


class TestDreamBoothFluxConformance(BackendConformance):
    backend_name = "dreambooth"
    merges_lines = True

    def make_pipeline(self):
        pipe = tiny_flux_pipeline(seed=0)
        add_tiny_flux_lora(pipe, adapter_name="identity")
        return pipe

    def identity_kwargs(self):
        return {"id_prompt": "a photo of sks person", **SHORT_TEXT}

    def stock_kwargs(self):
        return dict(SHORT_TEXT)


class TestDreamBoothFluxTrueCFGConformance(TestDreamBoothFluxConformance):
    """With ``true_cfg_scale > 1`` and a negative prompt every line runs its negative pass."""

    def identity_kwargs(self):
        return {**super().identity_kwargs(), "negative_prompt": "blurry", "true_cfg_scale": 2.0}

    def stock_kwargs(self):
        return {**super().stock_kwargs(), "negative_prompt": "blurry", "true_cfg_scale": 2.0}
