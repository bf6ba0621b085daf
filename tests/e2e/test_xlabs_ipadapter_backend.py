"""The XLabs FLUX IP-Adapter backend end to end on the tiny offline FluxPipeline (a random
adapter under the XLabs key names, loaded from a real safetensors file through our loader):
the conformance kit with distilled guidance and with true CFG, the semantic line's exact
per-row switch, the stock call's bits with the method off, the transformer evaluations of
the formula, IdAP's text length, several people, state restored after a failure, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import bf_core  # noqa: E402
from bf_backends.xlabs_ipadapter import testing  # noqa: E402
from bf_backends.xlabs_ipadapter.loader import load_xlabs_ip_adapter  # noqa: E402
from bf_backends.xlabs_ipadapter.state import (  # noqa: E402
    ip_attention_processors,
    masked_processors,
)
from bf_core import Person  # noqa: E402
from bf_core.errors import CheckpointError, ConfigError  # noqa: E402
from bf_core.testing import BackendConformance, batch_invariant_kernels  # noqa: E402
from bf_core.testing.fingerprint import pipeline_fingerprint  # noqa: E402

STEPS = 6
PROMPT = "a person is kneeling by a small lake"
SHORT_TEXT = {"max_sequence_length": 64}  # T5 padded to 64 tokens, not 512
TRUE_CFG = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one thread (see the ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def pipe():
    return testing.tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def photo():
    return testing.reference_photo()


def other_photo(size: int = 96):
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    from PIL import Image

    return Image.fromarray(pixels.numpy())


def call_kwargs(**extra):
    return dict(dict(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64,
                     output_type="np", generator=torch.Generator().manual_seed(0), **SHORT_TEXT),
                **extra)


def wrapped(pipe, config=None, **extra):
    return bf_core.wrap(pipe, config=config)(**call_kwargs(**extra))


# -- the conformance kit -----------------------------------------------------------------------
class TestXLabsConformance(BackendConformance):
    backend_name = "xlabs_ipadapter"
    merges_lines = True

    def make_pipeline(self):
        return testing.tiny_pipeline(seed=0)

    def identity_kwargs(self):
        return {"id_images": [testing.reference_photo()], **SHORT_TEXT}

    def stock_kwargs(self):
        return {"ip_adapter_image": testing.reference_photo(), **SHORT_TEXT}


class TestXLabsTrueCFGConformance(TestXLabsConformance):
    """With ``true_cfg_scale > 1`` and a negative prompt every line runs its negative pass, the
    ID lines' on the black-image negative IP embeds."""

    def identity_kwargs(self):
        return {**super().identity_kwargs(), **TRUE_CFG}

    def stock_kwargs(self):
        return {**super().stock_kwargs(), **TRUE_CFG}


# -- the semantic line's switch ----------------------------------------------------------------
def transformer_inputs(rows: int, seed: int = 1, tokens: int = 16, text: int = 8):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(rows, tokens, 64, generator=g),
                timestep=torch.full((rows,), 0.5), guidance=torch.full((rows,), 3.5),
                pooled_projections=torch.randn(rows, 32, generator=g),
                encoder_hidden_states=torch.randn(rows, text, 32, generator=g),
                txt_ids=torch.zeros(text, 3), img_ids=torch.zeros(tokens, 3), return_dict=False)


def run_transformer(transformer, inputs, **joint):
    with torch.no_grad():
        return transformer(**inputs, joint_attention_kwargs=joint)[0]


@pytest.fixture()
def plain_processors(pipe):
    """A context swapping diffusers' plain ``FluxAttnProcessor`` in for the IP processors."""
    from contextlib import contextmanager

    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    @contextmanager
    def swapped():
        transformer = pipe.transformer
        original = dict(transformer.attn_processors)
        names = set(ip_attention_processors(transformer))
        transformer.set_attn_processor({name: FluxAttnProcessor() if name in names else proc
                                        for name, proc in original.items()})
        try:
            yield
        finally:
            transformer.set_attn_processor(dict(original))
    return swapped


def test_a_zero_row_of_a_merged_call_equals_the_plain_processor_exactly(pipe, plain_processors):
    """Rows with the mask 0 equal, bit for bit, the same rows through diffusers' plain
    ``FluxAttnProcessor`` (no IP embeds) and through the IP processors at scale 0; rows with
    the mask 1 equal the stock IP call."""
    transformer = pipe.transformer
    inputs = transformer_inputs(rows=3)
    embeds = [torch.randn(3, 1, testing.TINY_PROJECTION_DIM, generator=torch.Generator().manual_seed(2))]
    with masked_processors(transformer) as switch, switch.rows(torch.tensor([False, True, False])):
        merged = run_transformer(transformer, inputs, ip_adapter_image_embeds=embeds)
    ip_on = run_transformer(transformer, inputs, ip_adapter_image_embeds=embeds)
    with plain_processors():
        plain = run_transformer(transformer, inputs)
    pipe.set_ip_adapter_scale(0.0)
    try:
        scale_zero = run_transformer(transformer, inputs, ip_adapter_image_embeds=embeds)
    finally:
        pipe.set_ip_adapter_scale(1.0)
    assert torch.equal(merged[[0, 2]], plain[[0, 2]])
    assert torch.equal(merged[[0, 2]], scale_zero[[0, 2]])
    assert torch.equal(merged[1], ip_on[1])
    assert not torch.equal(merged[1], plain[1])  # the IP attention really acts on the on row


def test_zero_image_tokens_are_not_an_off_switch(pipe, plain_processors):
    """Why the semantic line masks the IP output instead of zeroing T_id: to_k_ip / to_v_ip have
    biases, so zero tokens still give keys and values and change the output."""
    transformer = pipe.transformer
    proc = next(iter(ip_attention_processors(transformer).values()))
    assert proc.to_k_ip[0].bias is not None and proc.to_v_ip[0].bias.abs().sum() > 0
    inputs = transformer_inputs(rows=1)
    projection = transformer.encoder_hid_proj

    def zero_tokens(module, args, projected):
        return [torch.zeros_like(tokens) for tokens in projected]

    handle = projection.register_forward_hook(zero_tokens)
    try:
        zeroed = run_transformer(transformer, inputs, ip_adapter_image_embeds=[
            torch.randn(1, 1, testing.TINY_PROJECTION_DIM)])
    finally:
        handle.remove()
    with plain_processors():
        plain = run_transformer(transformer, inputs)
    assert not torch.equal(zeroed, plain)


def test_the_masked_processors_are_installed_for_the_call_and_the_originals_put_back(pipe, photo):
    before = dict(pipe.transformer.attn_processors)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(
        {type(p).__name__ for p in ip_attention_processors(module).values()}))
    try:
        wrapped(pipe, id_images=[photo])
    finally:
        handle.remove()
    assert seen and all(names == {"RowMaskedIPProcessor"} for names in seen)
    after = pipe.transformer.attn_processors
    assert list(after) == list(before)
    assert all(after[name] is proc for name, proc in before.items())


# -- the method off: the stock call ------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled guidance", "true CFG"])
@pytest.mark.parametrize("source", ["id_images", "ip_adapter_image_embeds"])
def test_method_off_is_the_stock_call_with_ip_adapter_image(cfg, source, pipe, photo):
    """``bf(prompt, id_images=[photo])`` with the method off equals ``pipe(prompt,
    ip_adapter_image=photo)`` bit for bit, the true-CFG negative pass (the black image) too;
    so do precomputed embeds, and two images per prompt."""
    off = bf_core.BFConfig(enabled=False)
    for extra in ({}, {"num_images_per_prompt": 2}):
        stock = pipe(**call_kwargs(ip_adapter_image=photo, **cfg, **extra)).images
        if source == "id_images":
            identity = {"id_images": [photo]}
        else:
            embeds = pipe.prepare_ip_adapter_image_embeds(photo, None, torch.device("cpu"), 1)
            identity = {"ip_adapter_image_embeds": embeds}
        result = wrapped(pipe, config=off, **identity, **cfg, **extra)
        np.testing.assert_array_equal(result.images, stock)


def test_the_stock_negative_is_the_black_image(pipe, photo):
    """With true CFG the baseline's unconditional call reads the embeds of a black image: an
    explicit black ``negative_ip_adapter_image`` gives the same bits, another image does not."""
    off = bf_core.BFConfig(enabled=False)
    default = wrapped(pipe, config=off, id_images=[photo], **TRUE_CFG).images
    black = np.zeros((64, 64, 3), dtype=np.uint8)
    explicit = wrapped(pipe, config=off, id_images=[photo], negative_ip_adapter_image=[black],
                       **TRUE_CFG).images
    other = wrapped(pipe, config=off, id_images=[photo], negative_ip_adapter_image=[other_photo()],
                    **TRUE_CFG).images
    np.testing.assert_array_equal(default, explicit)
    assert not np.array_equal(default, other)


# -- the lines ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, branches", [({}, 1), (TRUE_CFG, 2)], ids=["distilled", "true CFG"])
def test_transformer_sample_evaluations_follow_the_formula(cfg, branches, pipe, photo):
    result = wrapped(pipe, id_images=[photo], **cfg)
    m1 = result.diagnostics["idaf_start"]
    assert m1 == round(0.2 * STEPS)
    assert result.diagnostics["model_rows"] == branches * (STEPS + (STEPS - m1 - 1))
    assert result.diagnostics["model_calls"] == STEPS  # every step one merged call
    off = wrapped(pipe, config=bf_core.BFConfig(enabled=False), id_images=[photo], **cfg)
    assert off.diagnostics["model_rows"] == branches * STEPS


def test_the_semantic_line_runs_without_the_adapter(pipe, photo, plain_processors):
    """With the ID line never running, the method's image is the plain pipeline's (the
    adapter off) and not the stock IP call's; ``semantic_adapters="on"`` is the stock call."""
    config = bf_core.BFConfig(use_idaf=False, use_idap=False)
    semantic_only = wrapped(pipe, config=config, id_images=[photo]).images
    with plain_processors():
        plain = pipe(**call_kwargs()).images
    stock = pipe(**call_kwargs(ip_adapter_image=photo)).images
    np.testing.assert_array_equal(semantic_only, plain)
    assert not np.array_equal(semantic_only, stock)
    kept_on = bf_core.BFConfig(use_idaf=False, use_idap=False, semantic_adapters="on")
    np.testing.assert_array_equal(wrapped(pipe, config=kept_on, id_images=[photo]).images, stock)


def test_with_the_adapter_on_for_both_lines_the_id_line_shares_the_negative(pipe, photo):
    """``semantic_adapters="on"``: both lines' negative rows run the same model (IP on, the
    black negative), so the ID line evaluates its positive rows only; same bits as running
    its own negative pass."""
    on = dict(semantic_adapters="on", use_idap=False)
    with batch_invariant_kernels():
        shared = wrapped(pipe, config=bf_core.BFConfig(share_negative=True, **on),
                         id_images=[photo], output_type="latent", **TRUE_CFG)
        own = wrapped(pipe, config=bf_core.BFConfig(**on),
                      id_images=[photo], output_type="latent", **TRUE_CFG)
    m1 = shared.diagnostics["idaf_start"]
    assert shared.diagnostics["model_rows"] == 2 * STEPS + (STEPS - m1 - 1)
    assert own.diagnostics["model_rows"] == 2 * (STEPS + (STEPS - m1 - 1))
    assert torch.equal(shared.images, own.images)
    # With the semantic line's adapter off its negative rows differ: nothing is shared.
    off = wrapped(pipe, config=bf_core.BFConfig(share_negative=True, use_idap=False),
                  id_images=[photo], **TRUE_CFG)
    assert off.diagnostics["model_rows"] == 2 * (STEPS + (STEPS - m1 - 1))


def text_lengths(pipe):
    """Records the T5 length of every transformer call."""
    lengths = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True)
    return lengths, handle


def test_idap_tokens_take_the_place_of_t5_padding(pipe, photo):
    lengths, handle = text_lengths(pipe)
    try:
        result = wrapped(pipe, id_images=[photo])
    finally:
        handle.remove()
    k = bf_core.IdAPConfig().num_tokens
    assert set(lengths) == {64}  # the prompt leaves more than K padding tokens: trimmed
    assert result.diagnostics["idap_selection"].shape[1] == k
    assert result.diagnostics["model_calls"] == STEPS


def test_idap_without_room_in_the_padding_lengthens_the_semantic_context(pipe, photo):
    long_prompt = "two friends shaking hands at a street market, full body, wide shot, by a lake"
    people = [Person(id_images=[photo]), Person(id_images=[other_photo()])]
    lengths, handle = text_lengths(pipe)
    try:
        result = wrapped(pipe, people=people, prompt=long_prompt, max_sequence_length=16)
    finally:
        handle.remove()
    k, m2 = bf_core.IdAPConfig().num_tokens, result.diagnostics["idap_start"]
    assert result.diagnostics["idap_selection"].shape[1] == 2 * k  # N*K tokens prepended
    after_m2 = STEPS - m2 - 1
    assert lengths.count(16 + 2 * k) == after_m2  # the semantic line (N*K + L), alone after M2
    # Up to M2 one call per step; after it the semantic line and each ID line (L tokens) run
    # as calls of their own.
    assert lengths.count(16) == (m2 + 1) + 2 * after_m2
    assert result.diagnostics["model_calls"] == (m2 + 1) + 3 * after_m2


def test_id_lines_with_several_photos_and_true_cfg_run_their_branches_as_two_calls(pipe, photo):
    """Two photos give 8 IP tokens, the black negative 4: one call cannot hold both, so that
    line runs its conditional and unconditional rows as two transformer calls."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        two = wrapped(pipe, id_images=[photo, other_photo()], **TRUE_CFG)
    finally:
        handle.remove()
    m1 = two.diagnostics["idaf_start"]
    assert len(calls) == (m1 + 1) + 3 * (STEPS - m1 - 1)
    assert np.isfinite(two.images).all()
    one = wrapped(pipe, id_images=[photo], **TRUE_CFG)
    assert not np.array_equal(two.images, one.images)


# -- several people ----------------------------------------------------------------------------
def test_each_id_line_reads_its_own_persons_image_embeds(pipe, photo):
    """In the merged call the rows read [semantic: person A, ID 1: A, ID 2: B] embeds."""
    rows_seen = []
    handle = pipe.transformer.encoder_hid_proj.register_forward_pre_hook(
        lambda module, args: rows_seen.append(args[0][0].clone()))
    try:
        wrapped(pipe, people=[Person(id_images=[photo]), Person(id_images=[other_photo()])])
    finally:
        handle.remove()
    device = torch.device("cpu")
    a = pipe.prepare_ip_adapter_image_embeds(photo, None, device, 1)[0]
    b = pipe.prepare_ip_adapter_image_embeds(other_photo(), None, device, 1)[0]
    assert not torch.equal(a, b)
    merged = [embeds for embeds in rows_seen if embeds.shape[0] == 3]
    assert merged and all(torch.equal(embeds, torch.cat([a, a, b])) for embeds in merged)


def test_with_true_cfg_the_id_lines_negative_rows_read_the_black_image(pipe, photo):
    """Merged rows [semantic uncond, cond, ID uncond, cond]: the ID line's negative pass reads
    the black-image embeds; the semantic rows (IP off) read the person's, masked."""
    rows_seen = []
    handle = pipe.transformer.encoder_hid_proj.register_forward_pre_hook(
        lambda module, args: rows_seen.append(args[0][0].clone()))
    try:
        wrapped(pipe, id_images=[photo], **TRUE_CFG)
    finally:
        handle.remove()
    device = torch.device("cpu")
    a = pipe.prepare_ip_adapter_image_embeds(photo, None, device, 1)[0]
    black = pipe.prepare_ip_adapter_image_embeds(np.zeros((64, 64, 3), dtype=np.uint8), None,
                                                 device, 1)[0]
    merged = [embeds for embeds in rows_seen if embeds.shape[0] == 4]
    assert merged and all(torch.equal(embeds, torch.cat([a, a, black, a])) for embeds in merged)


def test_two_different_people_differ_from_one_person_twice(pipe, photo):
    regions = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    same = [Person(id_images=[photo], region=r) for r in regions]
    different = [Person(id_images=[photo], region=regions[0]),
                 Person(id_images=[other_photo()], region=regions[1])]
    a_a = wrapped(pipe, people=same, return_fusion_maps=True)
    a_b = wrapped(pipe, people=different, return_fusion_maps=True)
    assert (a_b.fusion_lines == 2).any()  # person B's line wins somewhere
    assert not np.array_equal(a_a.images, a_b.images)


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled", "true CFG"])
def test_two_people_merged_equal_separate_under_batch_invariant_kernels(cfg, pipe, photo):
    people = [Person(id_images=[photo], region=(0.0, 0.0, 0.5, 1.0)),
              Person(id_images=[other_photo()], region=(0.5, 0.0, 1.0, 1.0))]
    with batch_invariant_kernels():
        merged = wrapped(pipe, people=people, output_type="latent", **cfg)
        separate = wrapped(pipe, config=bf_core.BFConfig(batch_lines=False), people=people,
                           output_type="latent", **cfg)
    assert torch.equal(merged.images, separate.images)
    assert merged.diagnostics["model_calls"] == STEPS < separate.diagnostics["model_calls"]


# -- failures and refusals ---------------------------------------------------------------------
class _Boom(RuntimeError):
    pass


def test_state_restored_after_an_error_inside_a_merged_call(pipe, photo):
    pipe(**call_kwargs(ip_adapter_image=photo))  # transformers hooks its encoders on first use
    before = pipeline_fingerprint(pipe)
    processors = dict(pipe.transformer.attn_processors)
    calls = []

    def fail_late(module, args):
        calls.append(1)
        if len(calls) == STEPS - 1:  # after the ID line has joined the call
            raise _Boom("forced failure inside the transformer")

    handle = pipe.transformer.register_forward_pre_hook(fail_late)
    try:
        with pytest.raises(_Boom):
            wrapped(pipe, id_images=[photo])
    finally:
        handle.remove()
    assert pipeline_fingerprint(pipe) == before
    assert all(pipe.transformer.attn_processors[name] is proc for name, proc in processors.items())


def test_one_identity_input_only(pipe, photo):
    with pytest.raises(ConfigError, match="exactly one identity input.*id_images and "
                                          "ip_adapter_image"):
        wrapped(pipe, id_images=[photo], ip_adapter_image=photo)
    with pytest.raises(ConfigError, match=r"ip_adapter_image_embeds\[0\] is \(2, 1, 32\)"):
        wrapped(pipe, ip_adapter_image_embeds=[torch.zeros(2, 1, 32)])


def _write(tensors: dict, path) -> None:
    from safetensors.torch import save_file

    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, str(path))


@pytest.mark.parametrize(("tensors", "named"), [
    ({"pulid_encoder.id_embedding_mapping.0.weight": (4, 4), "pulid_ca.0.to_q.weight": (4, 4)},
     "a PuLID-FLUX checkpoint"),
    ({"image_proj.proj.weight": (128, 32), "ip_adapter.1.to_k_ip.weight": (32, 32)},
     "an SDXL IP-Adapter"),
], ids=["pulid-flux", "sdxl-ip-adapter"])
def test_the_loader_refuses_another_methods_file_and_leaves_the_pipeline(tensors, named, tmp_path):
    pipe = testing.tiny_pipeline(seed=0)
    before = pipeline_fingerprint(pipe)
    path = tmp_path / "ip_adapter.safetensors"
    _write(tensors, path)
    with pytest.raises(CheckpointError, match=f"{path}.*looks like {named}"):
        load_xlabs_ip_adapter(pipe, path, image_encoder=None)
    assert pipeline_fingerprint(pipe) == before


def test_the_loader_names_the_file_and_its_missing_and_unknown_keys(tmp_path):
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)
    state = testing.random_state_dict(pipe.transformer, testing.TINY_PROJECTION_DIM)
    state.pop("double_blocks.1.processor.ip_adapter_double_stream_k_proj.bias")
    state["double_blocks.1.processor.extra.weight"] = torch.zeros(2)
    path = testing.write_checkpoint(state, tmp_path)
    with pytest.raises(CheckpointError) as raised:
        load_xlabs_ip_adapter(pipe, tmp_path, image_encoder=None,
                              image_embed_dim=testing.TINY_PROJECTION_DIM)
    message = str(raised.value)
    assert str(path) in message
    assert "missing key(s): double_blocks.1.processor.ip_adapter_double_stream_k_proj.bias" in message
    assert "unexpected key(s): double_blocks.1.processor.extra.weight" in message
    assert getattr(pipe.transformer, "encoder_hid_proj", None) is None  # nothing loaded
    torch.save({"image_proj": {}, "ip_adapter": {}}, tmp_path / "ip-adapter.bin")
    with pytest.raises(CheckpointError, match="looks like an SDXL IP-Adapter or InstantID"):
        load_xlabs_ip_adapter(pipe, tmp_path / "ip-adapter.bin", image_encoder=None)


def test_the_backend_is_chosen_over_dreambooth_and_only_with_the_adapter(pipe):
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    assert bf_core.wrap(pipe).backend.name == "xlabs_ipadapter"
    assert bf_core.wrap(tiny_flux_pipeline(seed=0)).backend.name == "dreambooth"
