"""IdAF (method.md, "IdAF", paper eq. 6-10) against an independent reference implementation.

The reference below is written from the spec alone, the plain way: one sample and one line
at a time, in float64, with an explicit zero pad and box average, an explicit softmax over
the flattened H*W positions, and an explicit gather. It shares no helper with ``bf_core``.

Decision maps are compared exactly (``torch.equal``), never with a tolerance. The library
works in float32 log space and the reference in float64 probabilities, so the two could only
legitimately disagree at a position whose two scores are within float32 round-off of a tie.
Each comparison therefore first checks, from the float64 reference, that the random inputs
hold no such near-tie (``NEAR_TIE`` in log space, far above float32 error yet far below the
spread of real margins); the inputs are fixed by seeds, so this precondition is a property of
the test data, and it fails loudly, naming the seed, if the data are ever changed into a tie.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from bf_core.config import IdAFConfig
from bf_core.errors import ConfigError
from bf_core.fusion import idaf

# Smallest |log score_id - log score_sem| the random test data may hold. The library's float32
# smoothing and log_softmax stray from float64 by at most about 2e-6 per line at 128 x 128.
NEAR_TIE = 1e-5

# In "weight" mode the paper's 5:1 adds log 5 to the ID side, more than the whole spread of
# log W over random noise, so the ID line would win everywhere and a comparison with the
# reference would test nothing. Random-data comparisons use a ratio close to one there.
WEIGHT_MODE_LAMBDAS = {"lambda_id": 1.2, "lambda_sem": 1.0}


# --------------------------------------------------------------------------------------------
# Independent reference (float64, per sample, per line)
# --------------------------------------------------------------------------------------------


def reference_smooth(magnitude: torch.Tensor, smoothing: str, kernel: int) -> torch.Tensor:
    """S1 then S2 of method.md step 3 on one sample's (C, H, W) map; returns (C, H, W).

    "avgpool": the zero padding of 1 is written out and counted in the k x k average, so
    the box average itself runs without padding (H -> H + 2 - k + 1). "downup": bilinear
    down by the factor k (to floor(H / k), at least 1), then back. Both resize back up with
    bilinear, align_corners=False.
    """
    if smoothing == "none":
        return magnitude
    height, width = magnitude.shape[-2:]
    batch_of_one = magnitude[None]
    if smoothing == "avgpool":
        zero_padded = F.pad(batch_of_one, (1, 1, 1, 1), mode="constant", value=0.0)
        reduced = F.avg_pool2d(zero_padded, kernel_size=kernel, stride=1, padding=0)
    else:
        small = (max(1, height // kernel), max(1, width // kernel))
        reduced = F.interpolate(batch_of_one, size=small, mode="bilinear", align_corners=False)
    return F.interpolate(reduced, size=(height, width), mode="bilinear", align_corners=False)[0]


def reference_log_scores(saliency: torch.Tensor, lam: float, lambda_mode: str,
                         smoothing: str, kernel: int) -> torch.Tensor:
    """log of the score one line brings to the comparison, for one sample; (H, W) float64.

    saliency: (C, H, W). "temperature": W = softmax(lam * Abar), score W. "weight":
    W = softmax(Abar), score lam * W. The log is taken only to measure margins; the
    decision itself compares the scores as probabilities (see ``reference_idaf``).
    """
    smoothed = reference_smooth(saliency.double().abs(), smoothing, kernel)
    channels = smoothed.shape[0]
    abar = smoothed.sum(dim=0) / channels  # (H, W)
    inside = lam if lambda_mode == "temperature" else 1.0
    logits = inside * abar.flatten()
    exps = torch.exp(logits - logits.max())  # the max shift keeps exp finite; softmax unchanged
    weights = exps / exps.sum()
    outside = 1.0 if lambda_mode == "temperature" else lam
    return torch.log(outside * weights).reshape(abar.shape)


def reference_idaf(eps_id, eps_sem, config: IdAFConfig, saliency_id=None, saliency_sem=None):
    """Returns (fused (N, C, H, W), id_wins (N, 1, H, W) bool, smallest |log margin|)."""
    if saliency_id is None:
        saliency_id, saliency_sem = eps_id, eps_sem
    fused = torch.empty_like(eps_sem)
    id_wins = torch.zeros((eps_id.shape[0], 1, *eps_id.shape[2:]), dtype=torch.bool)
    smallest_margin = math.inf
    for n in range(eps_id.shape[0]):
        log_id = reference_log_scores(saliency_id[n], config.lambda_id, config.lambda_mode,
                                      config.smoothing, config.smooth_kernel)
        log_sem = reference_log_scores(saliency_sem[n], config.lambda_sem, config.lambda_mode,
                                       config.smoothing, config.smooth_kernel)
        # Strictly greater: ties go to the semantic line.
        wins = torch.exp(log_id) > torch.exp(log_sem)
        id_wins[n, 0] = wins
        fused[n] = eps_sem[n]
        fused[n][:, wins] = eps_id[n][:, wins]
        smallest_margin = min(smallest_margin, (log_id - log_sem).abs().min().item())
    return fused, id_wins, smallest_margin


def random_lines(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    eps_id = torch.randn(shape, generator=generator).to(dtype)
    eps_sem = torch.randn(shape, generator=generator).to(dtype)
    return eps_id, eps_sem


def guidance_responses(shape, seed, scale=5.0):
    """cfg_delta saliency sources: s * (eps_cond - eps_uncond_ref) for both lines."""
    generator = torch.Generator().manual_seed(seed + 1000)
    uncond_ref = torch.randn(shape, generator=generator)
    cond_id = torch.randn(shape, generator=generator)
    cond_sem = torch.randn(shape, generator=generator)
    return scale * (cond_id - uncond_ref), scale * (cond_sem - uncond_ref)


def mode_config(lambda_mode: str, **settings) -> IdAFConfig:
    lambdas = WEIGHT_MODE_LAMBDAS if lambda_mode == "weight" else {}
    return IdAFConfig(lambda_mode=lambda_mode, **lambdas, **settings)


def assert_matches_reference(eps_id, eps_sem, config, seed, saliency_id=None, saliency_sem=None):
    fused, id_wins = idaf(eps_id, eps_sem, config, saliency_id=saliency_id,
                          saliency_sem=saliency_sem)
    ref_fused, ref_wins, margin = reference_idaf(eps_id, eps_sem, config, saliency_id,
                                                 saliency_sem)
    assert margin > NEAR_TIE, (f"test data of seed {seed} hold a near-tie ({margin:.2e}); "
                               "pick another seed")
    assert id_wins.dtype == torch.bool
    assert id_wins.shape == (eps_id.shape[0], 1, *eps_id.shape[2:])
    assert torch.equal(id_wins, ref_wins)
    assert fused.dtype == eps_id.dtype
    assert torch.equal(fused, ref_fused)
    # Guard against a vacuous comparison: both lines must win somewhere.
    assert 0 < int(ref_wins.sum()) < ref_wins.numel()
    return id_wins


# --------------------------------------------------------------------------------------------
# Equality with the reference
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 4, 16, 16), (2, 4, 12, 20), (3, 1, 9, 7)]
MODES = ["temperature", "weight"]
SMOOTHINGS = ["avgpool", "downup", "none"]


@pytest.mark.parametrize("saliency", ["guided", "cfg_delta"])
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("lambda_mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_idaf_equals_reference(shape, lambda_mode, smoothing, saliency):
    seed = sum(shape)
    eps_id, eps_sem = random_lines(shape, seed)
    config = mode_config(lambda_mode, smoothing=smoothing, saliency=saliency,
                         smooth_kernel=2 if shape[-1] < 10 else 4)
    sources = guidance_responses(shape, seed) if saliency == "cfg_delta" else (None, None)
    assert_matches_reference(eps_id, eps_sem, config, seed, *sources)


@pytest.mark.parametrize("kernel", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("smoothing", ["avgpool", "downup"])
@pytest.mark.parametrize("lambda_mode", MODES)
def test_idaf_equals_reference_for_other_kernels(kernel, smoothing, lambda_mode):
    shape = (2, 4, 24, 18)
    eps_id, eps_sem = random_lines(shape, seed=100 + kernel)
    # Large boxes flatten random noise, so in weight mode the ratio must be closer to one
    # still for the semantic line to win anywhere.
    lambdas = {"lambda_id": 1.02, "lambda_sem": 1.0} if lambda_mode == "weight" else {}
    config = IdAFConfig(lambda_mode=lambda_mode, smoothing=smoothing, smooth_kernel=kernel,
                        **lambdas)
    assert_matches_reference(eps_id, eps_sem, config, seed=100 + kernel)


@pytest.mark.parametrize(("lambda_mode", "lambda_id", "lambda_sem"), [
    ("temperature", 2.5, 0.7), ("temperature", 1.0, 3.0), ("temperature", 12.0, 1.0),
    ("weight", 1.1, 1.0), ("weight", 0.9, 1.0), ("weight", 2.0, 1.7)])
def test_idaf_equals_reference_for_other_lambdas(lambda_mode, lambda_id, lambda_sem):
    eps_id, eps_sem = random_lines((2, 4, 16, 16), seed=7)
    config = IdAFConfig(lambda_id=lambda_id, lambda_sem=lambda_sem, lambda_mode=lambda_mode)
    assert_matches_reference(eps_id, eps_sem, config, seed=7)


@pytest.mark.parametrize(("lambda_mode", "saliency"),
                         [("temperature", "guided"), ("weight", "cfg_delta")])
def test_idaf_equals_reference_at_sdxl_latent_size(lambda_mode, saliency):
    """SDXL at 1024 px: (N, 4, 128, 128), the defaults of the paper otherwise."""
    shape = (2, 4, 128, 128)
    eps_id, eps_sem = random_lines(shape, seed=14)
    config = mode_config(lambda_mode, saliency=saliency)
    sources = guidance_responses(shape, 14) if saliency == "cfg_delta" else (None, None)
    assert_matches_reference(eps_id, eps_sem, config, 14, *sources)


def test_cfg_delta_decides_from_the_saliency_tensors_not_the_noise():
    shape = (1, 4, 16, 16)
    eps_id, eps_sem = random_lines(shape, seed=3)
    saliency_id, saliency_sem = guidance_responses(shape, seed=3)
    config = IdAFConfig(saliency="cfg_delta")
    _, from_saliency = idaf(eps_id, eps_sem, config, saliency_id=saliency_id,
                            saliency_sem=saliency_sem)
    _, from_noise = idaf(eps_id, eps_sem, IdAFConfig())
    assert not torch.equal(from_saliency, from_noise)
    # Only the magnitude of a source counts: flipping its sign changes nothing.
    _, flipped = idaf(eps_id, eps_sem, config, saliency_id=-saliency_id,
                      saliency_sem=-saliency_sem)
    assert torch.equal(flipped, from_saliency)


# --------------------------------------------------------------------------------------------
# What lambda does (method.md, "Why lambda matters" and "Lambda placement")
# --------------------------------------------------------------------------------------------


def face_on_a_scene(height=64, width=64, face_at=(20, 40), face_radius=5.0):
    """Saliency of a synthetic "face": a strong blob on the ID line over a weaker broad
    pattern; the semantic line is broad everywhere. Each (1, 4, H, W)."""
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    broad_id = 0.5 + 0.2 * torch.sin(xs / 7.0) * torch.cos(ys / 9.0)
    squared_distance = (ys - face_at[0]) ** 2 + (xs - face_at[1]) ** 2
    face = 2.0 * torch.exp(-squared_distance / (2 * face_radius**2))
    broad_sem = 0.6 + 0.1 * torch.sin((xs + ys) / 11.0)
    # The same plane in all four channels: the channel mean is the plane itself.
    saliency_id = (broad_id + face).expand(1, 4, height, width).clone()
    saliency_sem = broad_sem.expand(1, 4, height, width).clone()
    return saliency_id, saliency_sem, squared_distance


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_id_region_shrinks_towards_the_face_as_lambda_id_grows(smoothing):
    """Temperature mode: a larger lambda_id peaks the ID softmax, so the ID line keeps only
    the positions of its own highest saliency."""
    saliency_id, saliency_sem, squared_distance = face_on_a_scene()
    sweep = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0]
    areas, regions = [], []
    for lambda_id in sweep:
        config = IdAFConfig(lambda_id=lambda_id, smoothing=smoothing)
        _, id_wins = idaf(saliency_id, saliency_sem, config)
        areas.append(int(id_wins.sum()))
        regions.append(id_wins[0, 0])
    assert all(later <= earlier for earlier, later in pairwise(areas)), areas
    assert areas[-1] < areas[0], areas
    # At small lambda_id the ID line takes much of the frame; at large lambda_id only the face.
    assert areas[0] > squared_distance.numel() // 4, areas
    largest_lambda_region = regions[-1]
    assert largest_lambda_region.any()
    assert bool(largest_lambda_region[20, 40])  # the face centre
    assert squared_distance[largest_lambda_region].max() <= (2 * 5.0) ** 2


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_weight_mode_widens_the_id_region_as_lambda_id_grows(smoothing):
    """Weight mode compares lambda_id * W_id with lambda_sem * W_sem: scaling one side up can
    only add positions, so the regions are nested and grow."""
    saliency_id, saliency_sem, _ = face_on_a_scene()
    sweep = [0.25, 0.5, 0.8, 1.0, 1.25, 1.6, 2.5]
    regions = []
    for lambda_id in sweep:
        config = IdAFConfig(lambda_id=lambda_id, lambda_mode="weight", smoothing=smoothing)
        regions.append(idaf(saliency_id, saliency_sem, config)[1])
    for smaller, larger in pairwise(regions):
        assert torch.all(larger | ~smaller), "a larger lambda_id dropped an ID position"
    assert int(regions[-1].sum()) > int(regions[0].sum())
    assert bool(regions[0][0, 0, 20, 40])  # even the smallest weight keeps the face


def test_weight_mode_depends_only_on_the_lambda_ratio_and_temperature_mode_does_not():
    eps_id, eps_sem = random_lines((2, 4, 16, 16), seed=5)
    base = IdAFConfig(lambda_id=1.1, lambda_sem=1.0, lambda_mode="weight")
    doubled = IdAFConfig(lambda_id=2.2, lambda_sem=2.0, lambda_mode="weight")  # same ratio
    # log 2.2 - log 2.0 equals log 1.1 only up to float round-off, so the data must hold
    # no near-tie for the two decisions to be comparable exactly.
    assert reference_idaf(eps_id, eps_sem, doubled)[2] > NEAR_TIE
    base_wins = idaf(eps_id, eps_sem, base)[1]
    assert 0 < int(base_wins.sum()) < base_wins.numel()
    assert torch.equal(idaf(eps_id, eps_sem, doubled)[1], base_wins)
    # As inverse temperatures, doubling both lambdas sharpens both maps: a different decision.
    sharper = idaf(eps_id, eps_sem, IdAFConfig(lambda_id=2.2, lambda_sem=2.0))[1]
    assert not torch.equal(sharper, idaf(eps_id, eps_sem, IdAFConfig(lambda_id=1.1))[1])


# --------------------------------------------------------------------------------------------
# Ties, batches, purity, determinism, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("lambda_mode", MODES)
@pytest.mark.parametrize("lam", [0.3, 1.0, 5.0])
def test_identical_lines_with_equal_lambdas_tie_everywhere_and_the_semantic_line_wins(
        lam, lambda_mode, smoothing):
    eps, _ = random_lines((2, 4, 12, 12), seed=1)
    config = IdAFConfig(lambda_id=lam, lambda_sem=lam, lambda_mode=lambda_mode,
                        smoothing=smoothing)
    fused, id_wins = idaf(eps, eps.clone(), config)
    assert not id_wins.any()
    assert torch.equal(fused, eps)


@pytest.mark.parametrize(("lambda_id", "lambda_sem"), [(5.0, 1.0), (0.5, 3.0)])
def test_flat_saliency_on_both_lines_is_a_tie_whatever_the_temperatures(lambda_id, lambda_sem):
    """Two flat maps give two uniform softmaxes, equal at every position (a tie everywhere),
    whatever the inverse temperatures and the levels of the two lines."""
    shape = (1, 4, 8, 8)
    eps_id = torch.full(shape, 0.75)
    eps_sem = torch.full(shape, -2.0)
    config = IdAFConfig(lambda_id=lambda_id, lambda_sem=lambda_sem, smoothing="none")
    fused, id_wins = idaf(eps_id, eps_sem, config)
    assert not id_wins.any()
    assert torch.equal(fused, eps_sem)


@pytest.mark.parametrize("lambda_mode", MODES)
def test_each_sample_decides_on_its_own(lambda_mode):
    eps_id, eps_sem = random_lines((3, 4, 16, 20), seed=9)
    config = mode_config(lambda_mode)
    fused, id_wins = idaf(eps_id, eps_sem, config)
    for n in range(3):
        one_fused, one_wins = idaf(eps_id[n:n + 1], eps_sem[n:n + 1], config)
        assert torch.equal(one_wins, id_wins[n:n + 1])
        assert torch.equal(one_fused, fused[n:n + 1])
    # Changing one sample's inputs leaves the others' decisions alone.
    louder_id = eps_id.clone()
    louder_id[1] = 10.0 * louder_id[1]
    _, changed = idaf(louder_id, eps_sem, config)
    assert torch.equal(changed[0], id_wins[0]) and torch.equal(changed[2], id_wins[2])
    assert not torch.equal(changed[1], id_wins[1])


def test_inputs_are_not_mutated_and_the_output_is_new_memory():
    shape = (2, 4, 16, 16)
    eps_id, eps_sem = random_lines(shape, seed=2)
    saliency_id, saliency_sem = guidance_responses(shape, seed=2)
    originals = [t.clone() for t in (eps_id, eps_sem, saliency_id, saliency_sem)]
    fused, _ = idaf(eps_id, eps_sem, IdAFConfig(saliency="cfg_delta"),
                    saliency_id=saliency_id, saliency_sem=saliency_sem)
    for before, after in zip(originals, (eps_id, eps_sem, saliency_id, saliency_sem), strict=True):
        assert torch.equal(before, after)
    fused.add_(1.0)
    assert torch.equal(eps_id, originals[0]) and torch.equal(eps_sem, originals[1])


@pytest.mark.parametrize("lambda_mode", MODES)
def test_idaf_is_deterministic(lambda_mode):
    eps_id, eps_sem = random_lines((2, 4, 32, 32), seed=4)
    config = mode_config(lambda_mode)
    first = idaf(eps_id, eps_sem, config)
    second = idaf(eps_id.clone(), eps_sem.clone(), config)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_default_config_is_the_paper_config():
    eps_id, eps_sem = random_lines((1, 4, 16, 16), seed=6)
    implicit = idaf(eps_id, eps_sem)
    explicit = idaf(eps_id, eps_sem, IdAFConfig(lambda_id=5.0, lambda_sem=1.0))
    assert torch.equal(implicit[1], explicit[1]) and torch.equal(implicit[0], explicit[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 24, 24), (1, 4, 128, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_precision_fuses_in_its_dtype_and_decides_as_float32(dtype, shape):
    eps_id, eps_sem = random_lines(shape, seed=14, dtype=dtype)
    fused, id_wins = idaf(eps_id, eps_sem)
    assert fused.dtype == dtype
    assert id_wins.dtype == torch.bool and id_wins.shape == (shape[0], 1, *shape[2:])
    fused32, id_wins32 = idaf(eps_id.float(), eps_sem.float())
    assert torch.equal(id_wins, id_wins32)
    assert torch.equal(fused, fused32.to(dtype))  # the half values, gathered, not recomputed
    # And the decision is the spec's, not an artefact of half precision (no underflow ties).
    ref_fused, ref_wins, margin = reference_idaf(eps_id, eps_sem, IdAFConfig())
    assert margin > NEAR_TIE
    assert torch.equal(id_wins, ref_wins) and torch.equal(fused, ref_fused)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_mismatched_noise_shapes_are_refused_with_both_shapes_named():
    with pytest.raises(ConfigError, match=r"\(1, 4, 8, 8\).*\(1, 4, 8, 9\)"):
        idaf(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))


def test_noise_without_four_dimensions_is_refused():
    with pytest.raises(ConfigError, match="N, C, H, W"):
        idaf(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))


def test_cfg_delta_without_saliency_tensors_is_refused():
    eps_id, eps_sem = random_lines((1, 4, 8, 8), seed=0)
    with pytest.raises(ConfigError, match="cfg_delta.*saliency_id and saliency_sem"):
        idaf(eps_id, eps_sem, IdAFConfig(saliency="cfg_delta"))


@pytest.mark.parametrize("given", ["saliency_id", "saliency_sem"])
def test_only_one_saliency_tensor_is_refused(given):
    eps_id, eps_sem = random_lines((1, 4, 8, 8), seed=0)
    with pytest.raises(ConfigError, match="both saliency_id and saliency_sem"):
        idaf(eps_id, eps_sem, IdAFConfig(saliency="cfg_delta"), **{given: eps_id})


def test_saliency_of_another_shape_is_refused():
    eps_id, eps_sem = random_lines((1, 4, 8, 8), seed=0)
    with pytest.raises(ConfigError, match="saliency tensors must have the noise shape"):
        idaf(eps_id, eps_sem, IdAFConfig(saliency="cfg_delta"),
             saliency_id=torch.zeros(1, 4, 4, 4), saliency_sem=torch.zeros(1, 4, 4, 4))


def test_a_box_larger_than_the_padded_latent_is_refused_with_the_field_named():
    eps_id, eps_sem = random_lines((1, 4, 8, 8), seed=0)
    with pytest.raises(ConfigError, match="smooth_kernel=11"):
        idaf(eps_id, eps_sem, IdAFConfig(smooth_kernel=11))


def test_every_avgpool_kernel_the_config_accepts_runs_as_specified():
    """k = 1 is a valid config (smooth_kernel >= 1) and well defined by the spec (zero pad
    of 1, 1x1 box, bilinear back): it must either follow the spec or be refused up front."""
    eps_id, eps_sem = random_lines((1, 4, 12, 12), seed=8)
    try:
        config = IdAFConfig(smoothing="avgpool", smooth_kernel=1)
    except ConfigError:
        return
    assert_matches_reference(eps_id, eps_sem, config, seed=8)
