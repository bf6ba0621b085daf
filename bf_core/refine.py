"""Face refine: the identity put back into small faces, with the identity machinery on.

After a wrapped call, each selected face is cropped (a square of ``crop_factor`` times its
long side), resized to the host's working size, and denoised again by the backend's own
single-line algorithm (the baseline line: identity on) as masked img2img inside the one
loop (``bf_core.hosts.MaskedImg2Img``); the result is resized back and pasted with a soft
mask. Outside the paste mask's support the image is unchanged, bit for bit.

The geometry below is pure (numpy, pixels, boxes ``(x0, y0, x1, y1)`` with exclusive ends);
``refine_images`` runs the passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bf_core.config import BFConfig, RefineConfig
from bf_core.errors import ConfigError

Box = tuple[int, int, int, int]


# -- geometry ------------------------------------------------------------------------------------
def pixel_box(box: Sequence[float], width: int, height: int) -> Box:
    """A box in fractions of the image -> whole pixels inside it (at least 1 x 1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ConfigError(f"refine_boxes: {tuple(box)} is not a box (x0, y0, x1, y1) in "
                          "fractions of the image with x0 < x1 and y0 < y1")
    left, top = int(math.floor(x0 * width)), int(math.floor(y0 * height))
    right = max(left + 1, int(math.ceil(x1 * width)))
    bottom = max(top + 1, int(math.ceil(y1 * height)))
    return left, top, min(right, width), min(bottom, height)


def scaled_box(box: Sequence[float], scale: float, width: int, height: int) -> Box:
    """The box scaled by ``scale`` about its centre, rounded outwards, clipped to the image."""
    x0, y0, x1, y1 = box
    cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return (max(0, int(math.floor(cx - half_w))), max(0, int(math.floor(cy - half_h))),
            min(width, int(math.ceil(cx + half_w))), min(height, int(math.ceil(cy + half_h))))


def grown_box(box: Box, pixels: int, width: int, height: int) -> Box:
    """The box grown by ``pixels`` on every side, clipped to the image."""
    x0, y0, x1, y1 = box
    return (max(0, x0 - pixels), max(0, y0 - pixels), min(width, x1 + pixels),
            min(height, y1 + pixels))


def square_crop(face: Sequence[float], factor: float, width: int, height: int) -> Box:
    """A square of ``factor`` times the face's long side around its centre, moved (not
    shrunk) to stay inside the image; at most the image's short side."""
    x0, y0, x1, y1 = face
    side = min(int(math.ceil(max(x1 - x0, y1 - y0) * factor)), width, height)
    left = int(round((x0 + x1) / 2 - side / 2))
    top = int(round((y0 + y1) / 2 - side / 2))
    left, top = min(max(left, 0), width - side), min(max(top, 0), height - side)
    return left, top, left + side, top + side


def box_mask(box: Box, width: int, height: int) -> np.ndarray:
    """(height, width) float32: 1 inside the box, 0 outside."""
    mask = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1.0
    return mask


def soft_mask(box: Box, blur_px: int, width: int, height: int) -> np.ndarray:
    """(height, width) float32 paste weights: the box mask smoothed by a separable triangle
    kernel of half-width ``blur_px``, so its support is exactly the box grown by
    ``blur_px`` (0 beyond it, also in floating point) and it is 1 deep inside."""
    mask = box_mask(box, width, height)
    if blur_px == 0:
        return mask
    taps = np.arange(-blur_px, blur_px + 1)
    kernel = (blur_px + 1 - np.abs(taps)).astype(np.float64)
    kernel /= kernel.sum()
    for axis in (0, 1):
        mask = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), axis, mask)
    mask[mask < 1e-7] = 0.0  # convolution round-off must not reach beyond the support
    return mask.astype(np.float32)


def paste(image: np.ndarray, patch: np.ndarray, crop: Box, alpha: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) with ``patch`` (h, w, 3) blended into ``crop`` by ``alpha`` (H, W):
    out = image (1 - a) + patch a. Where a is 0 the pixel is ``image``'s, bit for bit."""
    out = image.copy()
    x0, y0, x1, y1 = crop
    weight = alpha[y0:y1, x0:x1, None]
    region = out[y0:y1, x0:x1]
    blended = region * (1 - weight) + patch * weight
    out[y0:y1, x0:x1] = np.where(weight > 0, blended, region)
    return out


def resize_rgb(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w, 3) float pixels resized with Lanczos, channel by channel in float."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F")
                           .resize((width, height), Image.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


# -- which faces -----------------------------------------------------------------------------------
def select_faces(boxes: Sequence[Sequence[float]], config: RefineConfig, people: int = 1
                 ) -> list[tuple[float, float, float, float]]:
    """The faces to refine: the largest first, ``max_faces`` per person, each with a short
    side under ``max_face_px`` (larger faces are drawn well already)."""
    small = [tuple(float(v) for v in box) for box in boxes
             if min(box[2] - box[0], box[3] - box[1]) < config.max_face_px]
    small.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    return small[: config.max_faces * people]


def detected_faces(image: np.ndarray, detector: Any) -> list[tuple[float, ...]]:
    """Face boxes (pixels) found in an (H, W, 3) float image by ``detector.detect``."""
    from PIL import Image

    picture = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return [tuple(float(v) for v in face.bbox) for face in detector.detect(picture)]


def default_detector(config: RefineConfig):
    """The library's face analysis at the pass's detection size (1024: the 640 default
    shrinks a full-body frame until small faces are missed)."""
    from bf_core.faces import FaceAnalyzer

    return FaceAnalyzer(det_size=(config.detector_size, config.detector_size))


# -- one pass --------------------------------------------------------------------------------------
@dataclasses.dataclass
class FacePass:
    """One face of one image to refine: where it is, where the crop is, which person."""

    image_index: int
    face: Box
    crop: Box
    person: Any
    seed: int


def pass_config(config: BFConfig) -> BFConfig:
    """The pass's lines: the backend's own single-line algorithm (identity on), or for the
    ``identity="off"`` ablation the semantic line alone (the base model)."""
    if config.refine.identity == "on":
        return dataclasses.replace(config, enabled=False)
    return dataclasses.replace(config, enabled=True, use_idaf=False, use_idap=False,
                               semantic_adapters="off")


def crop_pixels(image: np.ndarray, crop: Box, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: the crop of an (H, W, 3) float image, resized."""
    x0, y0, x1, y1 = crop
    resized = resize_rgb(image[y0:y1, x0:x1], size, size)
    return torch.from_numpy(resized).permute(2, 0, 1)[None] * 2 - 1


def picture_of(pixels: torch.Tensor):
    """(1, 3, H, W) pixels in [-1, 1] as a PIL image (what face analysers read)."""
    from PIL import Image

    array = ((pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    return Image.fromarray(array.astype(np.uint8))


def latent_mask(face_mask_box: Box, crop: Box, size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) 0/1: the sampler's mask box in crop coordinates, on the latent grid (a
    cell is in when any of its pixels is: the pass may change a little more, never less)."""
    x0, y0, x1, y1 = crop
    scale = size / (x1 - x0)
    box = (int(math.floor((face_mask_box[0] - x0) * scale)),
           int(math.floor((face_mask_box[1] - y0) * scale)),
           int(math.ceil((face_mask_box[2] - x0) * scale)),
           int(math.ceil((face_mask_box[3] - y0) * scale)))
    pixels = torch.from_numpy(box_mask(box, size, size))[None, None]
    return (torch.nn.functional.adaptive_max_pool2d(pixels, grid) > 0).float()


def work_size(call: Any, config: RefineConfig) -> int:
    """The side the crop is denoised at: the config's, else the host's native size."""
    return call.native_size if config.work_size is None else config.work_size


# -- the passes ------------------------------------------------------------------------------------
#: the main call's keywords a pass sets itself (or cannot take: it denoises one crop)
PASS_OWN_KEYWORDS = frozenset({
    "prompt", "prompt_2", "height", "width", "num_inference_steps", "timesteps", "sigmas",
    "latents", "generator", "output_type", "return_dict", "num_images_per_prompt",
    "denoising_end", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback",
    "callback_steps", "negative_prompt", "negative_prompt_2", "original_size", "target_size",
    "crops_coords_top_left", "negative_original_size", "negative_target_size",
    "negative_crops_coords_top_left"})


def per_image(value: Any, index: int, images_per_prompt: int) -> Any:
    """A prompt-like argument of image ``index``: the string, or its prompt's entry."""
    if value is None or isinstance(value, str):
        return value
    return value[index // images_per_prompt]


def hand_boxes(refine_boxes: Any, count: int) -> list[list[tuple[float, ...]]] | None:
    """``refine_boxes``: one list of fraction boxes for every image, or one list per image."""
    if refine_boxes is None:
        return None
    if not isinstance(refine_boxes, (list, tuple)):
        raise ConfigError("refine_boxes must be a list of (x0, y0, x1, y1) boxes in fractions "
                          f"(or one such list per image), got {type(refine_boxes).__name__}")
    flat = all(isinstance(v, (int, float)) for box in refine_boxes for v in
               (box if isinstance(box, (list, tuple)) else [None]))
    per = [list(refine_boxes)] * count if flat else [list(boxes) for boxes in refine_boxes]
    if len(per) != count:
        raise ConfigError(f"refine_boxes has {len(per)} lists of boxes but the call made "
                          f"{count} images; give one list per image, or one list for all")
    return per


def person_of(face: Box, people: Sequence[Any], regions: Sequence[Any] | None, index: int,
              size: tuple[int, int]) -> Any:
    """The person a face belongs to: the one whose region holds its centre, else the first."""
    if len(people) == 1 or not regions:
        return people[0]
    width, height = size
    cx, cy = (face[0] + face[2]) / 2 / width, (face[1] + face[3]) / 2 / height
    for person, region in zip(people, regions, strict=True):
        if region is None:
            continue
        grid = region[index]
        row, col = min(int(cy * grid.shape[0]), grid.shape[0] - 1), min(int(cx * grid.shape[1]),
                                                                         grid.shape[1] - 1)
        if bool(grid[row, col]):
            return person
    return people[0]


def base_seed(generator: Any) -> int:
    """The main call's seed (a pass uses it plus the face's index)."""
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    if isinstance(first, torch.Generator):
        return int(first.initial_seed())
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def refine_images(wrapper: Any, main_call: Any, images: np.ndarray, people: Sequence[Any],
                  config: BFConfig, kwargs: dict[str, Any], refine_boxes: Any = None,
                  detector: Any = None, regions: Sequence[Any] | None = None
                  ) -> tuple[np.ndarray, list[list[Box]], list[dict[str, Any]]]:
    """Refine the faces of (N, H, W, 3) float ``images``; returns the refined images, the
    face boxes refined per image (pixels) and one diagnostics entry per pass."""
    from bf_core import loop

    settings = config.refine
    count, height, width = images.shape[:3]
    boxes = hand_boxes(refine_boxes, count)
    if boxes is None:
        detector = detector or default_detector(settings)
        found = [detected_faces(image, detector) for image in images]
    else:
        found = [[pixel_box(box, width, height) for box in image_boxes] for image_boxes in boxes]
    arguments = main_call.arguments
    if arguments.prompt is None:
        raise ConfigError("refine_faces needs the prompt as text (the pass encodes it for the "
                          "crop); prompt_embeds alone cannot be refined")
    steps, strength = settings.steps(arguments.num_inference_steps or 50)
    size = work_size(main_call, settings)
    seed = base_seed(arguments.generator)
    refined, used, info, face_index = images.copy(), [], [], 0
    images_per_prompt = arguments.num_images_per_prompt or 1
    for i in range(count):
        faces = select_faces(found[i], settings, len(people))
        used.append([tuple(int(round(v)) for v in face) for face in faces])
        for face in faces:
            face_pass = FacePass(i, tuple(int(round(v)) for v in face),
                                 square_crop(face, settings.crop_factor, width, height),
                                 person_of(face, people, regions, i, (width, height)),
                                 seed + face_index)
            refined[i], entry = run_pass(wrapper, loop, face_pass, refined[i], config, kwargs,
                                         arguments, steps, strength, size, images_per_prompt)
            info.append(entry)
            face_index += 1
    return refined, used, info


def pass_call_kwargs(backend: Any, face_pass: FacePass, kwargs: dict[str, Any], arguments: Any,
                     steps: int, size: int, images_per_prompt: int) -> dict[str, Any]:
    """The pass's call keywords: the main call's own (backend options, guidance), the
    image's prompt (the backend's ``refine_prompt`` may rewrite it) and negative prompt, the
    crop's size, the pass's steps and seed."""
    index = face_pass.image_index
    prompt = per_image(arguments.prompt, index, images_per_prompt)
    id_prompt = face_pass.person.id_prompt or backend.default_id_prompt
    rewrite = getattr(backend, "refine_prompt", None)
    prompt = rewrite(prompt, id_prompt) if rewrite is not None else prompt
    own = {name: value for name, value in kwargs.items() if name not in PASS_OWN_KEYWORDS}
    call_kwargs = dict(own, prompt=prompt, height=size, width=size, num_inference_steps=steps,
                       generator=torch.Generator().manual_seed(face_pass.seed),
                       output_type="np")
    negative = per_image(arguments.negative_prompt, index, images_per_prompt)
    if negative is not None:
        call_kwargs["negative_prompt"] = negative
    return call_kwargs


def run_pass(wrapper: Any, loop: Any, face_pass: FacePass, image: np.ndarray, config: BFConfig,
             kwargs: dict[str, Any], arguments: Any, steps: int, strength: float, size: int,
             images_per_prompt: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One face: crop, masked img2img with the backend's single line, paste."""
    from bf_core.hosts import MaskedImg2Img

    settings, height, width = config.refine, image.shape[0], image.shape[1]
    backend = wrapper.backend
    call_kwargs = pass_call_kwargs(backend, face_pass, kwargs, arguments, steps, size,
                                   images_per_prompt)
    own = {name: value for name, value in kwargs.items() if name not in PASS_OWN_KEYWORDS}
    prompt = call_kwargs["prompt"]
    pixels = crop_pixels(image, face_pass.crop, size)
    per_crop = getattr(backend, "refine_options", None)  # e.g. InstantID's keypoints
    if per_crop is not None and settings.identity == "on":
        call_kwargs.update(per_crop(picture_of(pixels), own))
    call = wrapper.host.open_call(wrapper.pipe, (), call_kwargs)
    mask_box = scaled_box(face_pass.face, settings.mask_scale, width, height)
    sampler_box = grown_box(mask_box, settings.mask_dilate_px, width, height)
    factor = wrapper.pipe.vae_scale_factor
    grid = (size // factor, size // factor)
    call.img2img = MaskedImg2Img(call.encode_images(pixels),
                                 call.latent_layout(latent_mask(sampler_box, face_pass.crop,
                                                                size, grid)), strength)
    pass_cfg = pass_config(config)
    session = backend.open_session(call, pass_cfg)
    latents, record = loop.run(call, session, pass_cfg, [face_pass.person])
    result = call.decode(latents, "np")[0]
    x0, y0, x1, y1 = face_pass.crop
    patch = resize_rgb(result, x1 - x0, y1 - y0)
    alpha = soft_mask(mask_box, settings.mask_blur_px, width, height)
    entry = {"image": face_pass.image_index, "face": face_pass.face, "crop": face_pass.crop,
             "prompt": prompt,
             "steps": steps, "effective_steps": call.num_inference_steps,
             "model_calls": record.diagnostics["model_calls"], "seed": face_pass.seed}
    return paste(image, patch, face_pass.crop, alpha), entry


def to_output(images: np.ndarray, output_type: str, pipe: Any) -> Any:
    """(N, H, W, 3) float images in the call's output type (np, pil or pt)."""
    if output_type == "np":
        return images
    if output_type == "pil":
        return pipe.image_processor.numpy_to_pil(images)
    return pipe.image_processor.numpy_to_pt(images)
