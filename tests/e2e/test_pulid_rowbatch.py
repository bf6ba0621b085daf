"""PuLID with both lines in one UNet call: the per-row ID attention switch is exact, the loop
is faithful to separate calls, the cases that cannot be switched per row fall back, and the
ID state is restored after a failure inside a merged call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import bf_core
from bf_backends.pulid.backend import PuLIDSession
from bf_backends.pulid.testing import tiny_face_image, tiny_pipeline
from bf_core.hosts.sdxl import RowBatch, SDXLModel, merge_row_batches
from bf_core.records import Line, Person
from bf_core.testing import batch_invariant_kernels, opened_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PROMPT = "a person is kneeling by a small lake"
STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("v1.1")


@contextmanager
def session_for(pipe, mode: str = "fidelity", **config) -> Iterator[PuLIDSession]:
    """An opened session whose lines were given the identity of one test photo."""
    with opened_session(pipe, config=bf_core.BFConfig(**config), pulid_mode=mode) as session:
        identity = session.encoder.encode(Person([tiny_face_image(0)]))
        session.conditioning(Line.SEMANTIC, identity)
        yield session


def line_batch(line: Line, rows: int, length: int, seed: int) -> RowBatch:
    generator = torch.Generator().manual_seed(seed)
    return RowBatch(line, 3, torch.tensor(500), torch.randn(rows, 4, 8, 8, generator=generator),
                    ("uncond", "cond"), torch.randn(rows, length, 64, generator=generator),
                    torch.randn(rows, 32, generator=generator),
                    torch.randn(rows, 6, generator=generator))


def plain_unet_call(session: PuLIDSession, batch: RowBatch) -> torch.Tensor:
    """The UNet call without the session's ID state (whatever the state holds is used)."""
    with torch.no_grad():
        return SDXLModel(session.pipe)(batch)


@pytest.mark.parametrize("mode", ["fidelity", "extremely_style", "plain"])
def test_row_state_is_exact_for_each_row_of_one_merged_call(pipe, mode):
    semantic = line_batch(Line.SEMANTIC, 2, 85, seed=1)  # IdAP's K extra tokens: padding
    semantic.encoder_hidden_states[0] = 0  # the stock all-zero negative of the ID-off line
    identity = line_batch(Line.ID, 2, 77, seed=2)
    merged = merge_row_batches([semantic, identity])
    assert merged.encoder_attention_mask is not None
    state = pipe.pulid.state
    with session_for(pipe, mode) as session:
        assert session.supports_row_batching(merged)

        with torch.no_grad():
            mixed = session.predict(merged, SDXLModel(pipe))
        with state.disabled():
            id_off = plain_unet_call(session, merged)
        # ID on for the whole batch: each line's rows with that line's E_neg / E layout.
        positive, negative = session.id_embeddings()
        rows_on = [session.rows_embedding(part, positive, negative) for part in merged.parts]
        with state.using(torch.cat([embedding for embedding, _ in rows_on]), rows_on[0][1]):
            id_on = plain_unet_call(session, merged)

        # Same inputs, same batch, same kernels: every row is bit for bit its own line's model.
        assert torch.equal(mixed[:2], id_off[:2])
        assert torch.equal(mixed[2:], id_on[2:])
        assert not torch.allclose(id_off[2:], id_on[2:])  # the ID attention really acts
        assert torch.isfinite(mixed).all()
        if session.attention_config.ortho != "off":
            # ORTHO divides 0 by 0 on the zero negative; the off row never takes that value.
            assert not torch.isfinite(id_on[0]).all()
        assert state.enabled_rows is None and state.id_embedding is None  # restored


def loop_call(pipe, config: bf_core.BFConfig, guidance_scale: float = 5.0, steps: int = STEPS,
              **call):
    return bf_core.wrap(pipe, config=config)(
        prompt=PROMPT, id_images=[tiny_face_image(0)], num_inference_steps=steps, height=64,
        width=64, guidance_scale=guidance_scale, output_type="latent",
        generator=torch.Generator().manual_seed(0), **call)


@pytest.mark.parametrize(("semantic_adapters", "guidance_scale", "share_negative"), [
    ("off", 5.0, False),
    ("off", 1.0, False),  # no CFG: the ID rows attend to [E_neg ; 0 ; E ; 0]
    ("on", 3.0, True),  # every row with ID; the ID line has its positive rows only
], ids=["cfg", "guidance-1", "id-on-shared-negative"])
def test_batched_loop_matches_separate_calls(pipe, semantic_adapters, guidance_scale,
                                             share_negative):
    def run(batch_lines):
        config = bf_core.BFConfig(batch_lines=batch_lines, share_negative=share_negative,
                                  semantic_adapters=semantic_adapters)
        return loop_call(pipe, config, guidance_scale)

    with batch_invariant_kernels():  # else kernels differ by batch size (~1e-6)
        separate, batched = run(False), run(True)
    id_steps = STEPS - separate.diagnostics["idaf_start"] - 1
    assert id_steps > 0
    assert separate.diagnostics["model_calls"] == STEPS + id_steps
    assert batched.diagnostics["model_calls"] == STEPS  # one call per step
    assert batched.diagnostics["model_rows"] == separate.diagnostics["model_rows"]
    assert torch.equal(batched.images, separate.images)


def test_other_text_processors_fall_back_to_separate_calls(pipe):
    processors = list(pipe.pulid.attention.processors.values())
    replaced = [processor.text_processor for processor in processors]
    merged = merge_row_batches([line_batch(Line.SEMANTIC, 2, 77, 1),
                                line_batch(Line.ID, 2, 77, 2)])
    with session_for(pipe) as session:
        assert session.supports_row_batching(merged)
    # The classic processor computes attention differently: our text attention would not
    # equal it bit for bit in the off rows, so the lines run separately.
    try:
        for processor in processors:
            object.__setattr__(processor, "text_processor", AttnProcessor())
        with session_for(pipe) as session:
            assert not session.supports_row_batching(merged)
        out = loop_call(pipe, bf_core.BFConfig(), steps=5)
        assert out.diagnostics["model_calls"] == 5 + 5 - out.diagnostics["idaf_start"] - 1
        # With the ID on for the semantic rows too no per-row switch is needed.
        with session_for(pipe, semantic_adapters="on") as session:
            assert session.supports_row_batching(merged)
    finally:
        for processor, text_processor in zip(processors, replaced, strict=True):
            object.__setattr__(processor, "text_processor", text_processor)


def test_official_id_kwargs_and_baseline_rows_are_never_merged(pipe):
    parts = [line_batch(Line.SEMANTIC, 2, 77, 1), line_batch(Line.ID, 2, 77, 2)]
    for part in parts:
        part.cross_attention_kwargs = {"id_embedding": torch.zeros(2, 32, 64), "id_scale": 0.8}
    baseline = [line_batch(Line.BASELINE, 2, 77, 1), line_batch(Line.ID, 2, 77, 2)]
    with session_for(pipe) as session:
        assert not session.supports_row_batching(merge_row_batches(parts))
        assert not session.supports_row_batching(merge_row_batches(baseline))


def test_state_restored_after_a_failure_inside_a_merged_call(pipe):
    state = pipe.pulid.state
    before = ([(name, id(p)) for name, p in pipe.unet.attn_processors.items()],
              state.id_embedding, state.config, state.enabled, state.enabled_rows)
    seen = []

    def fail_inside_a_merged_call(module, args, output):
        if state.enabled_rows is not None:  # the per-row switch is live: a merged call
            seen.append(state.enabled_rows.tolist())
            raise RuntimeError("forced failure")

    handle = pipe.unet.mid_block.register_forward_hook(fail_inside_a_merged_call)
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            loop_call(pipe, bf_core.BFConfig(), pulid_mode="extremely_style")
    finally:
        handle.remove()
    assert seen == [[False, False, True, True]]  # semantic rows off, ID rows on
    after = ([(name, id(p)) for name, p in pipe.unet.attn_processors.items()],
             state.id_embedding, state.config, state.enabled, state.enabled_rows)
    assert after == before
