"""The conformance kit: checks every backend, built-in or third-party, must pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bf_core.testing.fingerprint import pipeline_fingerprint
from bf_core.testing.kernels import batch_invariant_kernels


class _Abort(RuntimeError):
    """Raised by the conformance kit's callback to interrupt a call mid-loop."""


class BackendConformance:
    """Checks every backend must pass; subclass in a pytest module (see module docstring).

    Subclasses set ``backend_name`` and implement ``make_pipeline`` (a fresh tiny pipeline
    the backend recognises) and ``identity_kwargs`` (extra call keywords: ``id_images``,
    ``id_prompt``, backend options). ``stock_kwargs`` gives the keywords under which the
    plain pipeline reproduces the backend's baseline (method off).
    """

    backend_name: str = ""
    #: The backend merges both lines into one UNet call per step (``supports_row_batching``).
    merges_lines: bool = False
    prompt = "a person is kneeling by a small lake, touching the water"
    steps = 6
    size = 64

    def make_pipeline(self) -> Any:
        raise NotImplementedError

    def identity_kwargs(self) -> dict[str, Any]:
        return {}

    def stock_kwargs(self) -> dict[str, Any]:
        """Keywords the stock ``pipe(...)`` needs to equal the baseline (e.g. IP-Adapter images)."""
        return {}

    def stock_call(self, pipe: Any, **kwargs: Any):
        """The stock pipeline's call the baseline must equal; override for custom pipelines."""
        return pipe(**kwargs)

    # -- helpers ------------------------------------------------------------------------------
    def common_kwargs(self, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        kwargs = dict(prompt=self.prompt, num_inference_steps=self.steps, height=self.size,
                      width=self.size, output_type="np",
                      generator=torch.Generator().manual_seed(seed))
        kwargs.update(overrides)
        return kwargs

    def wrapped(self, pipe: Any, **config_fields: Any):
        import bf_core

        return bf_core.wrap(pipe, backend=self.backend_name, config=bf_core.BFConfig(**config_fields))

    def run_wrapped(self, pipe: Any, seed: int = 0, **config_fields: Any) -> np.ndarray:
        return self.wrapped(pipe, **config_fields)(**self.common_kwargs(seed),
                                                    **self.identity_kwargs()).images

    def run_stock(self, pipe: Any, seed: int = 0) -> np.ndarray:
        return self.stock_call(pipe, **self.common_kwargs(seed), **self.stock_kwargs()).images

    # -- the checks ---------------------------------------------------------------------------
    def test_backend_recognizes_pipeline(self):
        import bf_core

        pipe = self.make_pipeline()
        assert bf_core.wrap(pipe, backend=self.backend_name).backend.name == self.backend_name

    def test_baseline_parity(self):
        pipe = self.make_pipeline()
        stock = self.run_stock(pipe)
        baseline = self.run_wrapped(pipe, enabled=False)
        np.testing.assert_array_equal(baseline, stock)

    def test_method_on_differs_from_baseline(self):
        pipe = self.make_pipeline()
        on = self.run_wrapped(pipe)
        off = self.run_wrapped(pipe, enabled=False)
        assert np.isfinite(on).all()
        assert np.abs(on - off).max() > 1e-4

    def test_deterministic_per_seed(self):
        pipe = self.make_pipeline()
        first, again = self.run_wrapped(pipe, seed=3), self.run_wrapped(pipe, seed=3)
        other = self.run_wrapped(pipe, seed=4)
        np.testing.assert_array_equal(first, again)
        assert np.abs(first - other).max() > 1e-4

    def test_output_shapes(self):
        pipe = self.make_pipeline()
        bf = self.wrapped(pipe)
        out = bf(**self.common_kwargs(num_images_per_prompt=2), **self.identity_kwargs(),
                 return_fusion_maps=True)
        assert out.images.shape == (2, self.size, self.size, 3)
        latent = self.size // pipe.vae_scale_factor
        assert out.fusion_maps.dtype == torch.bool
        assert tuple(out.fusion_maps.shape[1:]) == (2, 1, latent, latent)
        pil = bf(**self.common_kwargs(output_type="pil"), **self.identity_kwargs()).images
        assert len(pil) == 1 and pil[0].size == (self.size, self.size)

    def test_merged_lines_equal_separate_lines(self):
        """Both lines in one UNet call per step equal one call per line, bit for bit, once the
        kernels no longer depend on the batch size (see ``batch_invariant_kernels``)."""
        pipe = self.make_pipeline()
        with batch_invariant_kernels():
            separate = self.wrapped(pipe, batch_lines=False)(
                **self.common_kwargs(output_type="latent"), **self.identity_kwargs())
            merged = self.wrapped(pipe, batch_lines=True)(
                **self.common_kwargs(output_type="latent"), **self.identity_kwargs())
        assert merged.diagnostics["model_rows"] == separate.diagnostics["model_rows"]
        assert separate.diagnostics["model_calls"] > self.steps  # the ID line really ran
        if self.merges_lines:
            assert merged.diagnostics["model_calls"] == self.steps  # one call per step
        assert torch.equal(merged.images, separate.images)

    # -- several people ----------------------------------------------------------------------
    def split_identity(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``identity_kwargs`` as (one ``Person``'s fields, the other call keywords)."""
        kwargs = self.identity_kwargs()
        person = {k: kwargs.pop(k) for k in ("id_images", "id_prompt") if k in kwargs}
        return person, kwargs

    def test_one_person_on_the_whole_frame_equals_the_single_person_call(self):
        from bf_core.records import Person

        pipe = self.make_pipeline()
        person, options = self.split_identity()
        single = self.wrapped(pipe)(**self.common_kwargs(), **self.identity_kwargs(),
                                    return_fusion_maps=True)
        as_people = self.wrapped(pipe)(**self.common_kwargs(), **options,
                                       people=[Person(**person, region=(0.0, 0.0, 1.0, 1.0))],
                                       return_fusion_maps=True)
        np.testing.assert_array_equal(as_people.images, single.images)
        assert torch.equal(as_people.fusion_maps, single.fusion_maps)

    def test_several_people_win_only_in_their_regions(self):
        """Two people in the left and right halves (backends declaring ``max_people`` >= 2):
        ID line j wins nowhere outside its half, and merged calls equal separate ones."""
        import pytest

        from bf_core.protocols import max_people
        from bf_core.records import Person

        pipe = self.make_pipeline()
        bf = self.wrapped(pipe)
        if max_people(bf.backend) < 2:
            pytest.skip(f"the {self.backend_name} backend serves one person")
        person, options = self.split_identity()
        people = [Person(**person, region=(0.0, 0.0, 0.5, 1.0)),
                  Person(**person, region=(0.5, 0.0, 1.0, 1.0))]
        result = bf(**self.common_kwargs(), **options, people=people, return_fusion_maps=True)
        left, right = result.regions  # (N, h, w): one region per image
        per_image = result.fusion_lines[:, :, 0]  # (S, N, h, w)
        assert not (per_image[:, ~left] == 1).any()
        assert not (per_image[:, ~right] == 2).any()
        with batch_invariant_kernels():
            merged = self.wrapped(pipe)(**self.common_kwargs(output_type="latent"), **options,
                                        people=people)
            separate = self.wrapped(pipe, batch_lines=False)(
                **self.common_kwargs(output_type="latent"), **options, people=people)
        assert torch.equal(merged.images, separate.images)

    def test_auto_regions_follow_the_detected_faces_left_to_right(self):
        """``region="auto"`` with the test face detector (two faces, listed right first):
        person 1 gets the left face's region, person 2 the right one's, and each ID line
        wins only inside its own."""
        import pytest

        from bf_core.config import BFConfig
        from bf_core.protocols import max_people
        from bf_core.records import Person
        from bf_core.regions import box_mask, face_region
        from bf_core.testing.faces import ScriptedFaceDetector

        pipe = self.make_pipeline()
        bf = self.wrapped(pipe)
        if max_people(bf.backend) < 2:
            pytest.skip(f"the {self.backend_name} backend serves one person")
        person, options = self.split_identity()
        detector = ScriptedFaceDetector([(0.55, 0.2, 0.75, 0.4), (0.1, 0.3, 0.3, 0.5)])
        result = bf(**self.common_kwargs(), **options, return_fusion_maps=True,
                    people=[Person(**person, region="auto"), Person(**person, region="auto")],
                    preview_face_analyzer=detector)
        faces = result.diagnostics["auto_faces"][0]
        assert faces[0][0] < faces[1][0], "the left face goes to the first person"
        size, grid = detector.seen[0], result.regions[0].shape[-2:]
        per_image = result.fusion_lines[:, :, 0]  # (S, N, h, w)
        for j, (face, region) in enumerate(zip(faces, result.regions, strict=True), start=1):
            box = face_region(face, size, BFConfig().auto_region_scale)
            assert torch.equal(region[0], box_mask(box, *grid))
            assert not (per_image[:, ~region] == j).any()

    def test_state_restored_after_call(self):
        pipe = self.make_pipeline()
        before_images = self.run_stock(pipe)
        before = pipeline_fingerprint(pipe)
        self.run_wrapped(pipe)
        assert pipeline_fingerprint(pipe) == before
        np.testing.assert_array_equal(self.run_stock(pipe), before_images)

    def test_state_restored_after_exception(self):
        pipe = self.make_pipeline()
        before_images = self.run_stock(pipe)
        before = pipeline_fingerprint(pipe)

        def abort_late(pipeline, step, timestep, tensors):
            if step >= self.steps - 2:  # after the ID line has started
                raise _Abort("forced failure inside the loop")
            return tensors

        bf = self.wrapped(pipe)
        try:
            bf(**self.common_kwargs(), **self.identity_kwargs(), callback_on_step_end=abort_late)
        except _Abort:
            pass
        else:
            raise AssertionError("the callback's exception did not propagate")
        assert pipeline_fingerprint(pipe) == before
        np.testing.assert_array_equal(self.run_stock(pipe), before_images)
