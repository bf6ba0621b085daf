"""IdAP (method.md, "IdAP", paper eq. 11-12) against an independent reference implementation.

The reference is written from the spec alone, one batch element at a time in float64:
S = T_id Q^T, an explicit softmax over the N identity tokens, then I^T T_id. Pooled tokens
are real-valued sums, so they are compared with a tolerance sized to float32 arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from bf_core.aggregation import (
    idap_aggregate,
    idap_prepend,
    idap_query,
    idap_selection,
    idap_weights,
    load_idap_query,
)
from bf_core.errors import CheckpointError, ConfigError


def reference_weights(t_id: torch.Tensor, query: torch.Tensor, temperature=None) -> torch.Tensor:
    """I of eq. 11 for every batch element; (B, N, K) float64."""
    dim = t_id.shape[-1]
    divisor = 1.0 if temperature is None else math.sqrt(dim) if temperature == "sqrt_d" \
        else float(temperature)
    weights = []
    for tokens in t_id.double():  # (N, D)
        scores = tokens @ query.double().T / divisor  # (N, K)
        exps = torch.exp(scores - scores.max(dim=0).values)  # shift per query; softmax unchanged
        weights.append(exps / exps.sum(dim=0))  # normalised over the N tokens
    return torch.stack(weights)


def reference_aggregate(t_id: torch.Tensor, query: torch.Tensor, temperature=None):
    """T_id^s = I^T T_id (eq. 12); (B, K, D) float64."""
    weights = reference_weights(t_id, query, temperature)
    return torch.stack([w.T @ tokens for w, tokens in zip(weights, t_id.double(), strict=True)])


def random_tokens(batch, count, dim, seed, scale=1.0):
    return scale * torch.randn(batch, count, dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# The fixed query Q
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "dim", "seed"), [(8, 2048, 0), (4, 16, 3), (1, 1, 12345)])
def test_query_is_randn_from_a_seeded_cpu_generator(num_tokens, dim, seed):
    expected = torch.randn(num_tokens, dim, generator=torch.Generator("cpu").manual_seed(seed))
    query = idap_query(num_tokens, dim, seed)
    assert query.dtype == torch.float32 and query.device.type == "cpu"
    assert query.shape == (num_tokens, dim)
    assert torch.equal(query, expected)


def test_query_is_the_same_across_calls_and_leaves_the_global_generator_alone():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    first = idap_query(8, 64)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, idap_query(8, 64))
    assert torch.equal(first, idap_query(8, 64, seed=0))  # seed 0 is the default


def test_query_differs_across_seeds():
    assert not torch.equal(idap_query(8, 64, seed=0), idap_query(8, 64, seed=1))


@pytest.mark.parametrize(("num_tokens", "dim"), [(0, 16), (8, 0), (-1, 16)])
def test_query_of_no_tokens_or_no_width_is_refused(num_tokens, dim):
    with pytest.raises(ConfigError, match="num_tokens >= 1 and dim >= 1"):
        idap_query(num_tokens, dim)


def test_trained_query_loads_from_safetensors(tmp_path):
    trained = torch.randn(8, 32, dtype=torch.float16)
    path = tmp_path / "query.safetensors"
    save_file({"idap_query": trained}, str(path))
    loaded = load_idap_query(path, num_tokens=8, dim=32)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, trained.float())


def test_trained_query_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "query.safetensors"
    save_file({"idap_query": torch.zeros(4, 32)}, str(path))
    with pytest.raises(CheckpointError, match=r"\(4, 32\).*K=8, D=32"):
        load_idap_query(path, num_tokens=8, dim=32)


def test_trained_query_file_without_the_key_names_the_keys_it_has(tmp_path):
    path = tmp_path / "query.safetensors"
    save_file({"queries": torch.zeros(8, 32)}, str(path))
    with pytest.raises(CheckpointError, match="no 'idap_query'.*queries"):
        load_idap_query(path, num_tokens=8, dim=32)


def test_unreadable_query_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "query.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_idap_query(path, num_tokens=8, dim=32)


# --------------------------------------------------------------------------------------------
# Aggregation against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [None, 0.5, 7.0, "sqrt_d"])
@pytest.mark.parametrize(("batch", "count", "num_tokens", "dim"),
                         [(1, 5, 3, 16), (3, 7, 8, 32), (2, 4, 8, 24)])
def test_aggregate_equals_eq_11_12(batch, count, num_tokens, dim, temperature):
    t_id = random_tokens(batch, count, dim, seed=count)
    query = idap_query(num_tokens, dim, seed=dim)
    pooled = idap_aggregate(t_id, query, temperature)
    assert pooled.shape == (batch, num_tokens, dim) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), reference_aggregate(t_id, query, temperature),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(idap_weights(t_id, query, temperature).double(),
                               reference_weights(t_id, query, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [None, "sqrt_d"])
def test_aggregate_equals_eq_11_12_at_sdxl_width(temperature):
    """D = 2048, K = 8, 16 ID tokens (InstantID's count). Unscaled logits reach about 50 here,
    so float32 rounding of the logits is about 1e-5 and the tolerance follows it."""
    t_id = random_tokens(2, 16, 2048, seed=0)
    query = idap_query(8, 2048)
    torch.testing.assert_close(idap_aggregate(t_id, query, temperature).double(),
                               reference_aggregate(t_id, query, temperature),
                               rtol=1e-4, atol=1e-4)


def test_weights_are_a_distribution_over_the_tokens():
    t_id = random_tokens(3, 9, 32, seed=1)
    weights = idap_weights(t_id, idap_query(8, 32))
    assert weights.shape == (3, 9, 8) and weights.dtype == torch.float32
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 8))


def test_unscaled_logits_are_sharper_than_sqrt_d_scaled_ones():
    """Eq. 11 has no 1/sqrt(D); "sqrt_d" softens the aggregation (higher entropy over N)."""
    t_id = random_tokens(2, 16, 256, seed=2)
    query = idap_query(8, 256)

    def mean_entropy(weights):
        return -(weights * weights.clamp_min(1e-30).log()).sum(dim=1).mean()

    unscaled = idap_weights(t_id, query)
    softened = idap_weights(t_id, query, "sqrt_d")
    assert mean_entropy(softened) > mean_entropy(unscaled)
    assert torch.equal(softened, idap_weights(t_id, query, math.sqrt(256)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_aggregate_keeps_the_token_dtype(dtype):
    t_id = random_tokens(2, 6, 32, seed=3).to(dtype)
    query = idap_query(4, 32)
    pooled = idap_aggregate(t_id, query)
    assert pooled.dtype == dtype and pooled.shape == (2, 4, 32)
    expected = reference_aggregate(t_id, query).to(dtype)
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(pooled, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("temperature", [None, 3.0, "sqrt_d"])
def test_identical_tokens_aggregate_to_that_token(temperature):
    token = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(4))
    t_id = token.expand(2, 10, 48).contiguous()
    pooled = idap_aggregate(t_id, idap_query(8, 48), temperature)
    torch.testing.assert_close(pooled, token.expand(2, 8, 48), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [None, 3.0, "sqrt_d"])
def test_zero_tokens_aggregate_to_exact_zeros(temperature, dtype):
    """The negative branch of the semantic line relies on this: an all-zero ID sequence
    pools to K exact zero tokens."""
    t_id = torch.zeros(2, 77, 64, dtype=dtype)
    pooled = idap_aggregate(t_id, idap_query(8, 64), temperature)
    assert pooled.dtype == dtype
    assert torch.equal(pooled, torch.zeros(2, 8, 64, dtype=dtype))


def test_each_batch_element_pools_its_own_tokens():
    t_id = random_tokens(3, 5, 16, seed=5)
    query = idap_query(8, 16)
    pooled = idap_aggregate(t_id, query)
    for b in range(3):
        torch.testing.assert_close(pooled[b:b + 1], idap_aggregate(t_id[b:b + 1], query),
                                   rtol=1e-6, atol=1e-6)


def test_aggregate_does_not_mutate_its_inputs():
    t_id = random_tokens(2, 5, 16, seed=6)
    query = idap_query(8, 16)
    before = (t_id.clone(), query.clone())
    idap_aggregate(t_id, query, "sqrt_d")
    assert torch.equal(t_id, before[0]) and torch.equal(query, before[1])


def test_selection_names_the_token_each_query_weights_most():
    """Tokens that are scaled copies of the queries, shuffled: query k must select the
    position where its own copy was put."""
    query = idap_query(4, 64, seed=7)
    positions = torch.tensor([2, 0, 3, 1])  # query k is placed at token position positions[k]
    t_id = torch.empty(1, 4, 64)
    t_id[0, positions] = 0.5 * query
    assert torch.equal(idap_selection(t_id, query), positions[None])
    assert idap_selection(t_id, query).dtype == torch.int64


@pytest.mark.parametrize("temperature", [0.0, -1.0, "sqrt", "d"])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ConfigError, match="temperature must be None, 'sqrt_d' or > 0"):
        idap_aggregate(random_tokens(1, 3, 8, seed=0), idap_query(2, 8), temperature)


def test_nan_temperature_is_refused():
    with pytest.raises(ConfigError, match="temperature"):
        idap_aggregate(random_tokens(1, 3, 8, seed=0), idap_query(2, 8), float("nan"))


def test_tokens_without_a_batch_axis_are_refused():
    with pytest.raises(ConfigError, match=r"\(B, N, D\)"):
        idap_aggregate(torch.zeros(5, 16), idap_query(8, 16))


def test_query_of_another_width_is_refused_with_the_width_named():
    with pytest.raises(ConfigError, match=r"must be \(K, 16\)"):
        idap_aggregate(torch.zeros(1, 5, 16), idap_query(8, 32))


# --------------------------------------------------------------------------------------------
# Prepending to the scene prompt
# --------------------------------------------------------------------------------------------


def test_prepend_puts_the_k_id_tokens_before_the_scene_tokens():
    t_id_s = random_tokens(2, 8, 32, seed=8)
    t_sem = random_tokens(2, 77, 32, seed=9).half()
    prompt = idap_prepend(t_id_s, t_sem)
    assert prompt.shape == (2, 8 + 77, 32)
    assert prompt.dtype == torch.float16  # the scene prompt's dtype, as the UNet expects
    assert torch.equal(prompt[:, :8], t_id_s.half())
    assert torch.equal(prompt[:, 8:], t_sem)


def test_prepend_refuses_tokens_of_another_width():
    with pytest.raises(ConfigError, match="D=768.*D=2048"):
        idap_prepend(torch.zeros(1, 8, 768), torch.zeros(1, 77, 2048))


def test_prepend_refuses_another_batch_size():
    with pytest.raises(ConfigError, match=r"\(1\).*\(2\)"):
        idap_prepend(torch.zeros(1, 8, 64), torch.zeros(2, 77, 64))
