"""The page of ``beyondfacial app``: a form over ``generate``, its results, its errors.

The only module of the project that imports gradio. Every value of the form is one field of
``AppForm``; the handler rebuilds the form from them, runs it (``bf_core.app.run``) and
shows the library's own error message in the page when it refuses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from bf_core.app.form import MAX_PHOTOS, THRESHOLD_UNITS, AppForm, convert_thresholds
from bf_core.app.run import PipelineCache, run
from bf_core.config import (
    AUTO_REGION_FALLBACKS,
    IDAP_PEOPLE_POLICIES,
    LAMBDA_MODES,
    NEGATIVE_POLICIES,
    SALIENCIES,
    SEMANTIC_ADAPTER_POLICIES,
    SMOOTHINGS,
)
from bf_core.errors import BeyondFacialError

TINY_BANNER = (
    "**No model paths: this is the embedded tiny offline pipeline of the chosen backend, with "
    "random weights.** Its pictures are noise by design: they show the machinery (two lines, "
    "the fusion maps, the baseline), not quality. Give a base model and the backend's "
    "checkpoint under *Model paths* for real pictures.")
INTRO = (
    "# BeyondFacial\n"
    "The same person, whole, in a whole scene: the backend's identity method beside its own "
    "algorithm (the baseline), with the same seed and settings.")
#: System fonts only: the page must not reach out for web fonts (it works offline).
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "monospace"])


def backend_names() -> list[str]:
    """Installed backends, built-in and third-party (the plugin registry)."""
    from bf_core.plugins import get_registry

    return sorted(get_registry().backends())


def backend_defaults(name: str) -> tuple[str, str]:
    """A backend's example scene prompt (its extras') and its default P_id."""
    from bf_core.plugins import get_registry

    registry = get_registry()
    extras = registry.extras(name)
    id_prompt = registry.get_backend(name).default_id_prompt or (extras.id_prompt if extras
                                                                 else "")
    return (extras.prompt if extras else ""), id_prompt


def default_device() -> tuple[str, str]:
    """Where real weights load by default, and in which dtype (fp16 only on an accelerator)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "float16"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", "float16"
    return "cpu", "float32"


def page_error(exc: BaseException) -> gr.Error:
    """The exception's own message, in one line, named by its kind, for the page (the
    library's errors say what was wrong and what to do; no traceback reaches the page)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return gr.Error(f"{type(exc).__name__}: {message}", duration=None, print_exception=False)


def _prompt_inputs(form: AppForm, names: list[str]) -> dict[str, Any]:
    return {
        "backend": gr.Dropdown(names, value=form.backend, label="Backend",
                               info="the installed identity methods (beyondfacial backends)",
                               elem_id="backend"),
        "prompt": gr.Textbox(form.prompt, label="Scene prompt", lines=2, elem_id="prompt"),
        "id_prompt": gr.Textbox(form.id_prompt, label="P_id (the ID line's prompt)",
                                info="filled in with the backend's default", elem_id="id-prompt"),
        "negative_prompt": gr.Textbox(form.negative_prompt, label="Negative prompt",
                                      elem_id="negative-prompt"),
    }


def _run_inputs(form: AppForm) -> dict[str, Any]:
    with gr.Row():
        values = {
            "seeds": gr.Textbox(form.seeds, label="Seed(s)", info="e.g. 0, 1, 2",
                                elem_id="seeds"),
            "steps": gr.Number(form.steps, label="Steps", precision=0, minimum=1,
                               elem_id="steps"),
            "guidance_scale": gr.Textbox(str(form.guidance_scale or ""), label="Guidance scale",
                                         info="empty: the pipeline's own (SDXL: 5)",
                                         elem_id="guidance-scale"),
        }
    with gr.Row():  # a number box cannot start empty: 0 stands for the model's own size
        values["height"] = gr.Number(form.height or 0, label="Height", precision=0,
                                     info="0: the model's own (1024 for SDXL)", elem_id="height")
        values["width"] = gr.Number(form.width or 0, label="Width", precision=0,
                                    info="0: the model's own", elem_id="width")
    return values


def _threshold_inputs(form: AppForm) -> dict[str, Any]:
    with gr.Row():
        return {
            "threshold_unit": gr.Radio(list(THRESHOLD_UNITS), value=form.threshold_unit,
                                       label="M1 and M2 are given as", elem_id="threshold-unit"),
            "idaf_start": gr.Number(form.idaf_start, label="M1 (IdAF starts after it)",
                                    elem_id="idaf-start"),
            "idap_start": gr.Number(form.idap_start, label="M2 (IdAP starts after it)",
                                    elem_id="idap-start"),
        }


def _idaf_inputs(form: AppForm) -> dict[str, Any]:
    with gr.Row():
        return {
            "lambda_id": gr.Number(form.lambda_id, label="lambda_id", elem_id="lambda-id"),
            "lambda_sem": gr.Number(form.lambda_sem, label="lambda_sem", elem_id="lambda-sem"),
            "lambda_mode": gr.Dropdown(list(LAMBDA_MODES), value=form.lambda_mode,
                                       label="Lambda mode", elem_id="lambda-mode"),
            "smoothing": gr.Dropdown(list(SMOOTHINGS), value=form.smoothing, label="Smoothing",
                                     elem_id="smoothing"),
            "smooth_kernel": gr.Number(form.smooth_kernel, label="Smoothing kernel", precision=0,
                                       elem_id="smooth-kernel"),
            "saliency": gr.Dropdown(list(SALIENCIES), value=form.saliency,
                                    label="Saliency source", elem_id="saliency"),
        }


def _idap_inputs(form: AppForm) -> dict[str, Any]:
    with gr.Row():
        return {
            "idap_tokens": gr.Number(form.idap_tokens, label="K (IdAP tokens)", precision=0,
                                     elem_id="idap-tokens"),
            "idap_seed": gr.Number(form.idap_seed, label="IdAP query seed", precision=0,
                                   elem_id="idap-seed"),
            "idap_temperature": gr.Textbox(form.idap_temperature, label="IdAP temperature",
                                           info="empty (none), sqrt_d or a number",
                                           elem_id="idap-temperature"),
            "idap_negative": gr.Dropdown(list(NEGATIVE_POLICIES), value=form.idap_negative,
                                         label="IdAP negative", elem_id="idap-negative"),
            "idap_query_file": gr.Textbox(form.idap_query_file, label="IdAP query file",
                                          info="a safetensors file with idap_query (optional)",
                                          elem_id="idap-query-file"),
        }


def _switch_inputs(form: AppForm) -> dict[str, Any]:
    with gr.Row():
        return {
            "method_on": gr.Checkbox(form.method_on, label="Method on", elem_id="method-on"),
            "use_idaf": gr.Checkbox(form.use_idaf, label="IdAF", elem_id="use-idaf"),
            "use_idap": gr.Checkbox(form.use_idap, label="IdAP", elem_id="use-idap"),
            "semantic_adapters": gr.Dropdown(list(SEMANTIC_ADAPTER_POLICIES),
                                             value=form.semantic_adapters,
                                             label="Semantic line's adapters",
                                             elem_id="semantic-adapters"),
            "share_negative": gr.Checkbox(form.share_negative, label="Share the negative branch",
                                          elem_id="share-negative"),
            "batch_lines": gr.Checkbox(form.batch_lines, label="Batch lines (one UNet call)",
                                       elem_id="batch-lines"),
            "refine_faces": gr.Checkbox(form.refine_faces, label="Refine faces (second pass, "
                                        "identity on)", elem_id="refine-faces"),
            "refine_strength": gr.Number(form.refine_strength, label="Refine strength",
                                         elem_id="refine-strength"),
        }


def _people_inputs(form: AppForm) -> dict[str, Any]:
    gr.Markdown("Several people (set from Python or `generate --person`; recorded here so "
                "every knob is on the page):")
    with gr.Row():
        return {
            "idap_people": gr.Dropdown(list(IDAP_PEOPLE_POLICIES), value=form.idap_people,
                                       label="IdAP people", elem_id="idap-people"),
            "auto_region_scale": gr.Number(form.auto_region_scale, label="Auto region scale",
                                           elem_id="auto-region-scale"),
            "auto_region_fallback": gr.Dropdown(list(AUTO_REGION_FALLBACKS),
                                                value=form.auto_region_fallback,
                                                label="Auto region fallback",
                                                elem_id="auto-region-fallback"),
        }


def _model_inputs(form: AppForm) -> dict[str, Any]:
    with gr.Row():
        return {
            "base_model": gr.Textbox(form.base_model, label="Base model",
                                     info="a diffusers pipeline folder or hub id of the "
                                          "backend's base model (SDXL); empty: the tiny "
                                          "offline pipeline", elem_id="base-model"),
            "checkpoint": gr.Textbox(form.checkpoint, label="Checkpoint",
                                     info="the method's file (PhotoMaker, PuLID with its face "
                                          "models beside it, a DreamBooth LoRA) or folder "
                                          "(InstantID)", elem_id="checkpoint"),
            "device": gr.Dropdown([("where it loads", ""), "cuda", "mps", "cpu"],
                                  value=form.device, label="Device", elem_id="device"),
            "dtype": gr.Dropdown(["float16", "bfloat16", "float32"], value=form.dtype,
                                 label="Dtype", elem_id="dtype"),
        }


def _inputs(form: AppForm) -> dict[str, Any]:
    """Every form field as a component, by its ``AppForm`` name (photos apart)."""
    values = _prompt_inputs(form, backend_names())
    values.update(_run_inputs(form))
    with gr.Accordion("Advanced: every BFConfig knob (defaults: the paper's)", open=False,
                      elem_id="advanced"):
        for part in (_threshold_inputs, _switch_inputs, _idaf_inputs, _idap_inputs,
                     _people_inputs):
            values.update(part(form))
    with gr.Accordion("Model paths", open=False, elem_id="model-paths"):
        values.update(_model_inputs(form))
    return values


def _gallery(label: str, elem_id: str, columns: int = 2, file_format: str = "png",
             fit_columns: bool = True):
    return gr.Gallery(label=label, format=file_format, columns=columns, height="auto",
                      object_fit="contain", fit_columns=fit_columns, elem_id=elem_id)


def _outputs() -> dict[str, Any]:
    with gr.Row():
        outputs = {"method": _gallery("BeyondFacial", "method-images"),
                   "baseline": _gallery("Baseline (the method off)", "baseline-images")}
    outputs["strips"] = _gallery("Fusion maps per step (orange: the ID line won; blue: the "
                                 "semantic line)", "fusion-strips", columns=1)
    outputs["animations"] = _gallery("Decision map over the steps (GIF)", "fusion-animations",
                                     columns=3, file_format="gif", fit_columns=False)
    outputs["command"] = gr.Textbox(label="Reproduce with the CLI", lines=3, max_lines=8,
                                    buttons=["copy"], elem_id="cli-command")
    outputs["settings"] = gr.File(label="Settings (JSON, as generate writes them)",
                                  elem_id="settings-file")
    outputs["notes"] = gr.Markdown(elem_id="notes")
    return outputs


def _handler(components: dict[str, Any], outputs: dict[str, Any], out: Path,
             cache: PipelineCache):
    """The click handler: gradio hands it the inputs as one dict (they are given as a set)
    and its progress tracker; it answers with a dict of outputs."""
    def generate(data: dict, progress=gr.Progress()):  # noqa: B008 - how gradio finds it
        values = {name: data[component] for name, component in components.items()}
        photos = [str(p) for p in values.pop("photos") or []]
        try:
            result = run(AppForm(**values), photos, out, cache,
                         report=lambda fraction, text: progress(fraction, desc=text))
        except Exception as exc:
            if not isinstance(exc, BeyondFacialError):  # a bug, not a refusal: keep its trace
                logging.getLogger(__name__).exception("the run failed")
            raise page_error(exc) from None
        shown = {"method": result.method, "baseline": result.baseline, "strips": result.strips,
                 "animations": result.animations, "command": result.command,
                 "settings": str(result.settings),
                 "notes": "\n".join(f"- {note}" for note in result.notes)}
        return {outputs[name]: value for name, value in shown.items()}

    return generate


def _wire(values: dict[str, Any], photos, outputs: dict[str, Any], banner, button,
          out: Path, cache: PipelineCache) -> None:
    def backend_changed(name):
        prompt, id_prompt = backend_defaults(name)
        return gr.update(value=prompt), gr.update(value=id_prompt)

    values["backend"].change(backend_changed, values["backend"],
                             [values["prompt"], values["id_prompt"]])
    values["base_model"].change(lambda text: gr.update(visible=not str(text).strip()),
                                values["base_model"], banner)
    thresholds = [values["idaf_start"], values["idap_start"]]
    values["threshold_unit"].input(convert_thresholds,
                                   [values["threshold_unit"], *thresholds, values["steps"]],
                                   thresholds)
    components = {"photos": photos, **values}
    button.click(_handler(components, outputs, out, cache), set(components.values()),
                 list(outputs.values()), concurrency_limit=1, concurrency_id="device",
                 api_name="generate")


def initial_form() -> AppForm:
    """The form as the page opens: PhotoMaker (the paper's host) where installed, its
    example prompt and P_id, and the device real weights would load on."""
    names = backend_names()
    backend = "photomaker" if "photomaker" in names else (names[0] if names else "")
    prompt, id_prompt = backend_defaults(backend) if backend else ("", "")
    device, dtype = default_device()
    return AppForm(backend=backend, prompt=prompt, id_prompt=id_prompt, device=device,
                   dtype=dtype)


def build_app(out: str | Path, cache: PipelineCache | None = None) -> gr.Blocks:
    """The page; runs write under ``out``, pipelines come from ``cache``."""
    out, cache = Path(out).resolve(), cache or PipelineCache()
    form = initial_form()
    with gr.Blocks(title="BeyondFacial", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        banner = gr.Markdown(TINY_BANNER, visible=form.tiny, elem_id="tiny-banner")
        with gr.Row():
            with gr.Column(scale=5):
                photos = gr.File(label=f"Reference photos (1 to {MAX_PHOTOS} of one person; "
                                       "empty: the tiny pipeline's bundled photo)",
                                 file_count="multiple", file_types=["image"], type="filepath",
                                 elem_id="photos")
                values = _inputs(form)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=6):
                outputs = _outputs()
        _wire(values, photos, outputs, banner, button, out, cache)
    return app


def launch(host: str = "127.0.0.1", port: int | None = None,
           out: str | Path = "beyondfacial-app", cache: PipelineCache | None = None,
           block: bool = True) -> gr.Blocks:
    """Serve the page; one run at a time (the pipeline is not thread-safe), queued."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    app = build_app(out, cache)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
               allowed_paths=[str(out)], theme=THEME, quiet=not block, footer_links=[])
    return app


__all__ = ["TINY_BANNER", "build_app", "launch", "page_error"]
