"""The conformance kit run against the built-in DreamBooth backend (tiny LoRA)."""

from bf_core.testing import BackendConformance, add_tiny_lora, tiny_sdxl_pipeline


class TestDreamBoothConformance(BackendConformance):
    backend_name = "dreambooth"
    merges_lines = True

    def make_pipeline(self):
        pipe = tiny_sdxl_pipeline(seed=0)
        add_tiny_lora(pipe, adapter_name="identity")
        return pipe

    def identity_kwargs(self):
        return {"id_prompt": "a photo of sks person"}
