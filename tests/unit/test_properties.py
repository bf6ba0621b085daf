"""Property-based tests (hypothesis): the settings' domain, IdAF's and IdAP's invariants, and
wrong types at the call boundary.

The domain predicates below are written from the documentation (the docstrings of
``BFConfig``, ``IdAFConfig`` and ``IdAPConfig``), not from the validation code, so that the
two can disagree and the test then fails.
"""

from __future__ import annotations

import math
import numbers

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bf_core.aggregation import idap_aggregate, idap_query, idap_weights
from bf_core.config import BFConfig, IdAFConfig, IdAPConfig
from bf_core.errors import BeyondFacialError, ConfigError
from bf_core.fusion import fuse_lines, winning_lines

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.sampled_from(["sqrt_d", "avgpool", "none", "temperature", "aggregate", "off"]),
    st.lists(st.integers(0, 3), max_size=2))


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: field -> (the config class, whether the documentation admits the value)
DOCUMENTED_DOMAIN = {
    "lambda_id": (IdAFConfig, lambda v: _real(v) and math.isfinite(v) and 0 < v <= 1e4),
    "lambda_sem": (IdAFConfig, lambda v: _real(v) and math.isfinite(v) and 0 < v <= 1e4),
    "lambda_mode": (IdAFConfig, lambda v: v in ("temperature", "weight")),
    "smoothing": (IdAFConfig, lambda v: v in ("avgpool", "downup", "none")),
    "smooth_kernel": (IdAFConfig, lambda v: _int(v) and 1 <= v <= 128),
    "saliency": (IdAFConfig, lambda v: v in ("guided", "cfg_delta")),
    "num_tokens": (IdAPConfig, lambda v: _int(v) and 1 <= v <= 256),
    "seed": (IdAPConfig, lambda v: _int(v) and 0 <= v <= 2**63 - 1),
    "temperature": (IdAPConfig, lambda v: v is None or v == "sqrt_d"
                    or (_real(v) and math.isfinite(v) and 1e-3 <= v <= 1e3)),
    "negative": (IdAPConfig, lambda v: v in ("aggregate", "zeros")),
    "query_file": (IdAPConfig, lambda v: v is None or isinstance(v, str)),
    "idaf_start": (BFConfig, lambda v: (_int(v) and v >= 0) or (_real(v) and not _int(v)
                                                                 and 0 <= v < 1)),
    "idap_start": (BFConfig, lambda v: (_int(v) and v >= 0) or (_real(v) and not _int(v)
                                                                 and 0 <= v < 1)),
    "enabled": (BFConfig, lambda v: isinstance(v, bool)),
    "batch_lines": (BFConfig, lambda v: isinstance(v, bool)),
    "semantic_adapters": (BFConfig, lambda v: v in ("off", "on")),
}


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(sorted(DOCUMENTED_DOMAIN)), value=ANY_VALUE)
def test_config_accepts_exactly_its_documented_domain(field, value):
    cls, admitted = DOCUMENTED_DOMAIN[field]
    if admitted(value):
        assert getattr(cls(**{field: value}), field) == value
    else:
        with pytest.raises(ConfigError, match=field):
            cls(**{field: value})


# -- IdAF ---------------------------------------------------------------------------------------
def _noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


IDAF_CONFIGS = st.builds(IdAFConfig, lambda_id=st.sampled_from([0.5, 1.0, 5.0, 20.0]),
                         lambda_sem=st.sampled_from([0.5, 1.0, 3.0]),
                         lambda_mode=st.sampled_from(["temperature", "weight"]),
                         smoothing=st.sampled_from(["avgpool", "downup", "none"]),
                         smooth_kernel=st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(config=IDAF_CONFIGS, seed=st.integers(0, 2**16), batch=st.integers(2, 4),
       lines=st.integers(1, 3))
def test_idaf_decides_each_sample_alone_and_deterministically(config, seed, batch, lines):
    shape = (batch, 4, 8, 8)
    eps_sem = _noise(seed, shape)
    eps_ids = [_noise(seed + 1 + j, shape) for j in range(lines)]
    fused, winner = fuse_lines(eps_sem, eps_ids, config)
    again, winner_again = fuse_lines(eps_sem, eps_ids, config)
    assert torch.equal(fused, again) and torch.equal(winner, winner_again)
    for n in range(batch):
        alone, alone_winner = fuse_lines(eps_sem[n:n + 1], [e[n:n + 1] for e in eps_ids], config)
        assert torch.equal(alone_winner, winner[n:n + 1])
        assert torch.equal(alone, fused[n:n + 1])
    # Every position takes one line's signed noise, for all channels.
    stack = torch.stack([eps_sem, *eps_ids])  # (J+1, N, C, H, W)
    picked = stack.gather(0, winner.expand(-1, 4, -1, -1).unsqueeze(0)).squeeze(0)
    assert torch.equal(picked, fused)


@settings(max_examples=40, deadline=None)
@given(config=IDAF_CONFIGS, seed=st.integers(0, 2**16))
def test_idaf_ties_go_to_the_semantic_line_then_to_the_lowest_id_line(config, seed):
    eps = _noise(seed, (2, 4, 8, 8))
    equal = IdAFConfig(lambda_id=config.lambda_sem, lambda_sem=config.lambda_sem,
                       lambda_mode=config.lambda_mode, smoothing=config.smoothing,
                       smooth_kernel=config.smooth_kernel)
    _, winner = fuse_lines(eps, [eps.clone()], equal)
    assert not winner.any()  # identical lines, identical lambdas: the semantic line
    other = _noise(seed + 1, eps.shape)
    _, two = fuse_lines(other, [eps, eps.clone()], config)
    assert not (two == 2).any()  # identical ID lines: the lower one wins wherever they do


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.integers(-64, 64), lines=st.integers(1, 2),
       lam_id=st.sampled_from([1.0, 2.0, 4.0]), lam_sem=st.sampled_from([1.0, 2.0]))
def test_idaf_decision_is_invariant_to_a_constant_shift_of_a_lines_saliency(seed, shift, lines,
                                                                           lam_id, lam_sem):
    # Eq. 9 is a softmax over positions: a constant added to one line's map cancels. On
    # eighths and powers of two every step is exact, so the decision must be identical.
    config = IdAFConfig(lambda_id=lam_id, lambda_sem=lam_sem, smoothing="none")
    generator = torch.Generator().manual_seed(seed)

    def saliency():
        return torch.randint(0, 64, (2, 4, 8, 8), generator=generator).float() / 8

    sem, ids = saliency(), [saliency() for _ in range(lines)]
    base = winning_lines(sem, ids, config)
    offset = abs(shift) / 8  # saliency is |.|: keep every entry >= 0 so the shift survives it
    assert torch.equal(winning_lines(sem + offset, ids, config), base)
    assert torch.equal(winning_lines(sem, [ids[0] + offset, *ids[1:]], config), base)


# -- IdAP ---------------------------------------------------------------------------------------
TEMPERATURES = st.sampled_from([None, "sqrt_d", 0.5, 2.0])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), tokens=st.integers(1, 12),
       k=st.integers(1, 8), temperature=TEMPERATURES)
def test_idap_pools_each_sample_alone_into_convex_combinations(seed, batch, tokens, k,
                                                               temperature):
    t_id = _noise(seed, (batch, tokens, 16))
    query = idap_query(k, 16, seed=seed % 97)
    assert torch.equal(query, idap_query(k, 16, seed=seed % 97))  # a fixed Q per seed
    pooled = idap_aggregate(t_id, query, temperature)
    assert pooled.shape == (batch, k, 16)
    weights = idap_weights(t_id, query, temperature)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(batch, k))
    for n in range(batch):
        torch.testing.assert_close(idap_aggregate(t_id[n:n + 1], query, temperature),
                                   pooled[n:n + 1])
    low, high = t_id.min(dim=1, keepdim=True).values, t_id.max(dim=1, keepdim=True).values
    assert (pooled >= low - 1e-5).all() and (pooled <= high + 1e-5).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), tokens=st.integers(2, 12), temperature=TEMPERATURES)
def test_idap_ignores_token_order_and_a_shift_common_to_all_tokens(seed, tokens, temperature):
    t_id = _noise(seed, (1, tokens, 16))
    query = idap_query(4, 16, seed=1)
    weights = idap_weights(t_id, query, temperature)
    order = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(idap_aggregate(t_id[:, order], query, temperature),
                               idap_aggregate(t_id, query, temperature))
    # A vector added to every token adds a constant per query to the logits over N.
    shifted = t_id + _noise(seed + 1, (1, 1, 16))
    torch.testing.assert_close(idap_weights(shifted, query, temperature), weights,
                               atol=1e-5, rtol=1e-4)


# -- the call boundary --------------------------------------------------------------------------
WRONG = st.one_of(st.just(object()), st.dictionaries(st.text(max_size=2), st.integers(),
                                                     max_size=2),
                  st.binary(max_size=3), st.lists(st.integers(), min_size=1, max_size=2),
                  st.sampled_from([float("nan"), float("inf"), -1, -64, 0, 10**9, "", "many"]))
#: keyword -> the wrong values it gets (every one of these must be refused)
BAD_VALUES = {
    "prompt": st.one_of(WRONG.filter(lambda v: not isinstance(v, str)), st.just([])),
    "negative_prompt": st.one_of(st.just(object()), st.integers(), st.just([]), st.just([1])),
    "height": WRONG.filter(lambda v: not (isinstance(v, int) and v > 0 and v % 8 == 0)),
    "width": st.sampled_from([-8, 0, 7, 12.5, "64", True]),
    "num_inference_steps": st.one_of(st.sampled_from([0, -3, 2.5, "3"]), st.just([3])),
    "guidance_scale": st.one_of(st.sampled_from([float("nan"), -1.0, 1e9, "7"]), st.just([])),
    "num_images_per_prompt": st.sampled_from([0, -1, 1.5, "2"]),
    "guidance_rescale": st.sampled_from([-0.1, 1.5, float("nan"), "0.5"]),
    "output_type": st.one_of(st.text(max_size=5).filter(
        lambda v: v not in ("pil", "np", "pt", "latent")), st.integers()),
    "id_prompt": st.one_of(st.integers(), st.just(object()), st.lists(st.integers(), max_size=2)),
    "id_negative_prompt": st.one_of(st.integers(), st.just(object()), st.just(["a", "b"])),
    "config": st.one_of(st.integers(), st.text(max_size=3), st.just({"enabled": False})),
}


@pytest.fixture(scope="module")
def wrapper():
    import bf_core
    from bf_core.testing import add_tiny_lora, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity")
    return bf_core.wrap(pipe)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), keyword=st.sampled_from(sorted(BAD_VALUES)))
def test_wrong_values_at_the_call_boundary_raise_our_own_errors(wrapper, data, keyword):
    value = data.draw(BAD_VALUES[keyword], label=keyword)
    kwargs = dict(prompt="a person", num_inference_steps=2, height=64, width=64,
                  output_type="np", id_prompt="a photo of sks person")
    kwargs[keyword] = value
    with pytest.raises(BeyondFacialError):
        wrapper(**kwargs)


@pytest.mark.parametrize("keyword", ["height", "width"])
def test_a_zero_size_is_refused_not_taken_for_the_default(wrapper, keyword):
    """0 is a (wrong) size, not a missing one: the call names it instead of drawing at the
    pipeline's default size."""
    kwargs = dict(prompt="a person", num_inference_steps=2, height=64, width=64,
                  output_type="np", id_prompt="a photo of sks person") | {keyword: 0}
    with pytest.raises(ConfigError, match=keyword):
        wrapper(**kwargs)
