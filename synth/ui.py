"""The web UI: a Gradio page over synth.ui_requests.Generator, which generates through synth.infer.infer.

Live mode (Turbo's): every edit of the prompt, seed, steps, strength or sketch re-renders; the newest request of
a tab wins. Full mode: model, size (the highres chain above native), scheduler, guidance, number of images,
LoRAs with a scale each, textual inversions, prompter; Generate and Cancel (which stops the render on the device
within a step, synth.step_hooks); progress per step, labelled with its high-res stage; a gallery of the tab's
images; a dropped synth or A1111 PNG restores its settings. `serve(cfg, ...)` is what `python ui.py` runs;
`build(generator)` what tests start.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio loads: no calls home, works offline
import gradio as gr  # noqa: E402
from omegaconf import DictConfig

from synth.step_hooks import Cancelled  # noqa: E402
from synth.textual_inversion import SUFFIXES as EMBEDDING_SUFFIXES  # noqa: E402
from synth.ui_requests import Generator, Settings, check_accel_on_device, check_ui, is_blank  # noqa: E402

log = logging.getLogger(__name__)
USER_ERRORS = (ValueError, FileNotFoundError)


def live_default(cfg: DictConfig) -> bool:
    """ui.live=auto: live for models distilled for one step (Turbo), where a render takes about a keystroke."""
    return cfg.model.num_inference_steps <= 1 if cfg.ui.live == "auto" else bool(cfg.ui.live)


def serve(cfg: DictConfig, overrides: list[str], run_dir: Path, choices: dict[str, str]) -> None:
    """`python ui.py`: check the ui section, then serve the page until Ctrl-C."""
    # 1. Refuse an unsafe host (no auth) or a bad setting in one line, before Gradio loads.
    auth = check_ui(cfg.ui)
    # Gradio copies every file it serves (outputs, uploads) into its cache: kept inside the run folder, so
    # that the run folder is the only place the server serves files from.
    os.environ["GRADIO_TEMP_DIR"] = str(run_dir / ".gradio")

    # 2. Build the page and serve it until Ctrl-C. Gradio's own wait would swallow the KeyboardInterrupt (exit
    # 0); here it closes the server and goes on to the entry point: "interrupted", exit 130, as infer.py. PNGs
    # are written atomically (synth.images.save_png), so an interrupted request leaves no half-written file.
    generator = Generator(cfg, overrides, run_dir, choices)
    demo = build(generator)
    launch(demo, cfg.ui, run_dir, auth=auth, quiet=False)
    try:
        threading.Event().wait()
    finally:
        demo.close()


def launch(demo, ui: DictConfig, run_dir: Path, auth=None, port: int | None = None, quiet: bool = True):
    """demo.launch with synth's safe settings: local host unless told, no share link, uploads capped, files
    served only from the run folder. Returns at once; demo.close() stops the server."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=str(ui.host),
        server_port=port if port is not None else (ui.port or None),
        auth=auth,
        share=False,
        max_file_size=f"{ui.max_upload_mb}mb",
        allowed_paths=[str(run_dir)],
        prevent_thread_lock=True,
        quiet=quiet,
        footer_links=[],
        show_error=True,  # a failed request says why in the page (and to gradio_client)
    )


def _choice(value):
    return value or None


def _settings(prompt, negative, seed, steps, strength, model=None, scheduler=None, prompter=None, size=None,
              guidance=None, num_images=1, loras=()):
    return Settings(prompt=prompt or "", negative_prompt=negative or "", seed=int(seed or 0),
                    num_inference_steps=int(steps) if steps else None, denoise_strength=float(strength),
                    model=_choice(model), scheduler=_choice(scheduler), prompter=_choice(prompter),
                    size=str(size).strip() or None if size else None,
                    guidance_scale=float(guidance) if guidance not in (None, "") else None,
                    num_images=int(num_images or 1), loras=list(loras))


def _sketch_image(sketch):
    """The sketch pad's picture (its layers over its background), or None when nothing is on it."""
    if not sketch:
        return None
    image = sketch.get("composite") if isinstance(sketch, dict) else sketch
    return None if is_blank(image) else image


def _caption(path: Path) -> str:
    from synth.images import PARAMETERS_KEY, read_text

    return read_text(path).get(PARAMETERS_KEY, "")


def build(generator: Generator):
    """The page: live controls and sketch pad, output, full-mode settings, the tab's gallery."""
    from synth.config import group_options
    from synth.images import open_image_as_viewed

    cfg, ui = generator.base, generator.base.ui
    live_on = live_default(cfg)
    native = int(cfg.model.native_size)
    lora_dir = Path(str(ui.lora_dir)).expanduser() if ui.lora_dir else None
    lora_files = sorted(p.name for p in lora_dir.glob("*.safetensors")) if lora_dir else []
    embeddings_dir = Path(str(ui.embeddings_dir)).expanduser() if ui.get("embeddings_dir") else None
    embedding_files = sorted(p.name for p in embeddings_dir.iterdir()
                             if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES) if embeddings_dir else []

    with gr.Blocks(title="synth") as demo:
        gallery_state = gr.State([])  # this tab's images: (path, parameters); each tab has its own
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=str(cfg.prompt), elem_id="prompt", lines=2)
                negative = gr.Textbox(label="Negative prompt", value=str(cfg.negative_prompt), elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=int(cfg.seed), precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(1, 50, step=1, label="Steps", elem_id="steps",
                                      value=int(ui.live_steps) if live_on else int(cfg.model.num_inference_steps))
                    strength = gr.Slider(0.05, 1.0, step=0.05, value=float(cfg.denoise_strength),
                                         label="Strength (sketch)", elem_id="strength")
                live = gr.Checkbox(label="Live: re-render on every edit", value=live_on, elem_id="live")
                sketch = gr.ImageEditor(label="Sketch (draw, upload or paste; empty = text to image)", type="pil",
                                        format="png", canvas_size=(native, native), elem_id="sketch",
                                        brush=gr.Brush(default_size=max(2, native // 16)))
                upload = gr.File(label="Input image (checked, then put on the sketch pad)", type="filepath",
                                 elem_id="upload")
            with gr.Column():
                output = gr.Image(label="Output", type="filepath", format="png", interactive=False, elem_id="output",
                          height=360)
                info = gr.Textbox(label="Parameters", interactive=False, elem_id="info", lines=3)
                use_as_input = gr.Button("Use as input", elem_id="use-as-input")
        with gr.Accordion("Full mode", open=not live_on):
            with gr.Row():
                model = gr.Dropdown(group_options("model"), value=generator.choices.get("model"), label="Model",
                                    elem_id="model")
                scheduler = gr.Dropdown(group_options("scheduler"), value=generator.choices.get("scheduler"),
                                        label="Scheduler", elem_id="scheduler")
                prompter = gr.Dropdown(group_options("prompter"), value=generator.choices.get("prompter"),
                                       label="Prompter", elem_id="prompter")
            with gr.Row():
                size = gr.Textbox(label="Size (empty = native; above it the high-res chain runs)", value="",
                                  placeholder="1024 or 1216x832", elem_id="size")
                guidance = gr.Number(label="Guidance (empty = the model's)", value=None, elem_id="guidance")
                num_images = gr.Slider(1, 16, step=1, value=1, label="Images", elem_id="num-images")
            loras = gr.Dataframe(value=[[name, 0.0] for name in lora_files] or None, headers=["LoRA", "scale"],
                                 datatype=["str", "number"], label=f"LoRAs in {lora_dir} (scale 0 = off)",
                                 visible=bool(lora_files), interactive=True)
            embeddings = gr.Dropdown(embedding_files, value=[], multiselect=True, elem_id="embeddings",
                                     label=f"Textual inversions in {embeddings_dir} (keyword = file name)",
                                     visible=bool(embedding_files))
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel = gr.Button("Cancel", elem_id="cancel")
            restore = gr.File(label="Drop a synth or A1111 PNG: its settings come back", type="filepath",
                              file_types=[".png"], elem_id="restore")
        gallery = gr.Gallery(label="This tab's images", columns=8, height=240, elem_id="gallery")

        live_inputs = [prompt, negative, seed, steps, strength, sketch]

        def add_images(paths, state):
            state = state + [(str(path), _caption(path)) for path in paths]
            return str(paths[-1]), state[-1][1], state

        def show_gallery(state):
            # its own event after the image: the whole gallery travels to the page each time, the image first
            return [(path, caption) for path, caption in state]

        def live_render(prompt, negative, seed, steps, strength, sketch, live, state, request: gr.Request):
            """One live edit: skipped when live is off or a newer edit of this tab is waiting (see below)."""
            # Newest request wins. trigger_mode="always_last" collapses a tab's edits in the browser only; API
            # clients (gradio_client) and several triggers in flight reach the server anyway. So each request
            # claims its tab's newest number at once (concurrency_limit=None: nothing queues in front of
            # that), waits for the device, and is dropped if a newer one came meanwhile: no backlog, no stale image.
            session = request.session_hash or "api"
            number = generator.claim_newest(session)  # live off: still the newest edit, so older ones drop
            if not live:
                return gr.skip(), gr.skip(), gr.skip()
            with generator.lock:
                if not generator.is_newest(session, number):
                    return gr.skip(), gr.skip(), gr.skip()
                try:
                    paths = generator.generate(_settings(prompt, negative, seed, steps, strength),
                                               _sketch_image(sketch), number, session=session)
                except USER_ERRORS as error:
                    gr.Warning(str(error))  # while typing a toast, not an error box; the last image stays
                    return gr.skip(), gr.skip(), gr.skip()
                except Cancelled:
                    return gr.skip(), gr.skip(), gr.skip()
            return add_images(paths, state)

        def full_render(prompt, negative, seed, steps, strength, sketch, model, scheduler, prompter, size, guidance,
                        num_images, loras, embeddings, state, request: gr.Request, progress=gr.Progress()):
            """Generate: every full-mode setting; progress per denoising step, labelled with its high-res stage."""
            chosen = []
            if loras is not None and len(loras):
                rows = loras.values.tolist() if hasattr(loras, "values") else loras
                chosen = [(name, float(scale)) for name, scale in rows if scale not in (None, "", 0)]
            unknown = [name for name, _ in chosen if name not in lora_files]
            if unknown:  # only the folder's files: a name from an API client is not a path to anywhere else
                raise gr.Error(f"LoRA {unknown[0]!r} is not in ui.lora_dir={lora_dir}; choose one of: "
                               f"{', '.join(lora_files) or '(none)'}")
            chosen = [(str(lora_dir / name), scale) for name, scale in chosen]
            unknown = [name for name in embeddings or [] if name not in embedding_files]
            if unknown:  # as the LoRAs: names of the folder's files only
                raise gr.Error(f"embedding {unknown[0]!r} is not in ui.embeddings_dir={embeddings_dir}; choose one "
                               f"of: {', '.join(embedding_files) or '(none)'}")
            try:
                settings = _settings(prompt, negative, seed, steps, strength, model, scheduler, prompter, size,
                                     guidance, num_images, chosen)
                settings.textual_inversion = [str(embeddings_dir / name) for name in embeddings or []]
                paths = generator.generate(settings, _sketch_image(sketch), session=request.session_hash or "api",
                                           progress=lambda label, done, total: progress((done, total), desc=label))
            except USER_ERRORS as error:
                raise gr.Error(str(error)) from None
            except Cancelled:  # Cancel: the device stopped at the end of a step; nothing half-written to show
                return gr.skip(), gr.skip(), gr.skip()
            return add_images(paths, state)

        rendered = [output, info, gallery_state]
        gr.on([c.change for c in live_inputs], live_render, inputs=[*live_inputs, live, gallery_state],
              outputs=rendered, trigger_mode="always_last", concurrency_limit=None, api_name="live",
              show_progress="minimal").success(show_gallery, gallery_state, gallery, api_name="gallery", queue=False)
        full_inputs = [*live_inputs, model, scheduler, prompter, size, guidance, num_images, loras, embeddings,
                       gallery_state]
        event = generate.click(full_render, inputs=full_inputs, outputs=rendered, concurrency_limit=None,
                               api_name="generate")
        event.success(show_gallery, gallery_state, gallery, api_name=False, queue=False)
        def cancel_render(request: gr.Request):
            """Cancel: the page stops waiting (Gradio's cancels=) and the render stops after its running step."""
            generator.cancel(request.session_hash or "api")

        cancel.click(cancel_render, cancels=[event], concurrency_limit=None, api_name="cancel", show_progress="hidden")

        def use_output(path):
            if not path:
                return gr.skip()
            return {"background": path, "layers": [], "composite": path}

        # a value set by the server fires no change event of the sketch pad: the render follows explicitly
        use_as_input.click(use_output, inputs=[output], outputs=[sketch], api_name="use_as_input").then(
            live_render, inputs=[*live_inputs, live, gallery_state], outputs=rendered, concurrency_limit=None,
            api_name=False, show_progress="minimal").success(show_gallery, gallery_state, gallery, api_name=False,
                                                             queue=False)

        def load_upload(path):
            """An uploaded input image, read as synth reads any (refuses non-images, corrupt files, bombs)."""
            if not path:
                return gr.skip()
            try:
                image = open_image_as_viewed(path, "upload")
            except USER_ERRORS as error:
                raise gr.Error(f"{Path(path).name}: {str(error).partition(': ')[2] or error}") from None
            return {"background": image, "layers": [], "composite": image}

        upload.upload(load_upload, inputs=[upload], outputs=[sketch], api_name="load_image")

        def restore_settings(path):
            """A dropped PNG: synth's provenance (or A1111's parameters) back into the controls."""
            if not path:
                return [gr.skip()] * 11
            try:
                open_image_as_viewed(path, "png")  # an image at all, whole, not a bomb
                restored = generator.restore(path)
            except USER_ERRORS as error:
                raise gr.Error(f"{Path(path).name}: {error}") from None
            option = generator.model_option(restored)
            steps_value = restored.num_inference_steps or restored.model.num_inference_steps
            return [str(restored.prompt), str(restored.negative_prompt or ""), int(restored.seed), int(steps_value),
                    float(restored.denoise_strength), option or gr.skip(), restored.scheduler.name,
                    restored.prompter.name, str(restored.size or ""), restored.guidance_scale,
                    int(restored.num_images)]

        restore.upload(restore_settings, inputs=[restore],
                       outputs=[prompt, negative, seed, steps, strength, model, scheduler, prompter, size, guidance,
                                num_images], api_name="restore")

        def model_changed(option):
            return "default"  # another family's scheduler would not fit: the new model's own

        model.input(model_changed, inputs=[model], outputs=[scheduler], api_name=False)
    return demo


def start(overrides: list[str], run_dir: Path, port: int) -> tuple:
    """ui.py's page served from this process on 127.0.0.1:port without Hydra's run machinery (tests, bench);
    returns (demo, generator, url). demo.close() stops it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from synth.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="ui", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_dir = str(run_dir)
    check_ui(cfg.ui)
    check_accel_on_device(cfg)
    os.environ["GRADIO_TEMP_DIR"] = str(Path(run_dir) / ".gradio")
    generator = Generator(cfg, list(overrides), Path(run_dir), choices)
    demo = build(generator)
    launch(demo, cfg.ui, Path(run_dir), port=port)
    return demo, generator, f"http://127.0.0.1:{port}/"
