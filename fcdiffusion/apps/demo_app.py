"""The interactive demo behind `app.py`: upload or pick a photo, type a prompt, see the control modes side by side.

`load_demo` loads the weights once, at start-up: the distilled student (every mode, a few guidance-free steps)
and/or the four teachers (one mode each, guided DDIM). `Demo.translate` checks one request and runs it through
`fcdiffusion.core.inference.Translator`, the pipeline `test_distillation.py` uses, so the page shows what the script
would write for the same photo, prompt, steps and seed. `build_app` wraps that in a Gradio page in which a bad
request (no photo, an unreadable or huge file, an empty prompt, ...) becomes a message while the server keeps
serving; `launch` starts it.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fcdiffusion.core.devices import synchronize
from fcdiffusion.core.errors import RunError
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.guidance import check_guidance_scale
from fcdiffusion.core.images import to_uint8
from fcdiffusion.core.inference import Translator, check_prompt
from fcdiffusion.core.model import FrequencyControlledLDM
from fcdiffusion.core.paths import DOWNLOAD_HELP, student_file, teacher_checkpoint
from fcdiffusion.core.preview import PreviewSink, SamplingPreview
from fcdiffusion.core.student import FCDiffusionStudent
from fcdiffusion.core.tiny_vae import TinyVAE
from fcdiffusion.core.weights import KindMismatchError, load_student, load_teacher, max_sampling_steps
from fcdiffusion.train.dataset import LATENT_GRID, prepare_image
from fcdiffusion.train.demo_data import CAPTIONS, load_photo

# What `make quickstart` writes: tiny models that run on a CPU.
DEFAULT_LOGDIR = Path("outputs/quickstart/lightning_logs")
# Uploads with more pixels than this are refused from their header, before decoding (a 40 MP RGB photo already
# takes 120 MB decoded; it is resized to the model's 128 or 512 px anyway).
MAX_PIXELS = 40_000_000
MAX_UPLOAD = "50mb"  # Gradio refuses larger uploads itself
STUDENT, TEACHERS = "student", "teachers"
MODE_TASKS = {"mini_pass": "style-guided content creation", "low_pass": "semantic manipulation",
              "mid_pass": "scene translation", "high_pass": "style translation"}
EXAMPLES = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle_left", "camera", "hubble_deep_field", "coins")
# The results' gallery grows to show every mode's row (no scrolling), the tiny models' 128 px pictures enlarged sharply.
CSS = (".result-gallery .fixed-height, .result-gallery .grid-wrap { max-height: none !important; "
       "height: auto !important; } .result-gallery img { image-rendering: pixelated; }")


class DemoInputError(ValueError):
    """A request the demo refuses; the message is what the page shows."""


class MissingWeightsError(FileNotFoundError):
    """Weight files the demo was asked to serve are not there; the message says how to get them."""


# ---- the models ------------------------------------------------------------------------------------------------
def model_resolution(model: FrequencyControlledLDM) -> int:
    """The image size the model was built for: its latent size times the VAE's downsampling."""
    return model.image_size * 2 ** (len(model.first_stage_model.encoder.down) - 1)


@dataclass
class ServedModel:
    """One choice of the page's model picker: a translator per control mode and the sampling defaults."""

    name: str
    translators: dict[str, Translator]
    steps: int
    guidance_scale: float | None  # the default w; a fixed-w student's own (None in files that do not record it)
    resolution: int
    files: dict[str, Path]
    guidance_range: tuple[float, float] | None = None  # a guidance-conditioned student's w range
    guidance_fixed: bool = False  # a fixed-w student: it takes no other w (`FCDiffusionStudent.check_sampling`)
    max_steps: int = 1000  # the most sampling steps its sampler fits in the schedule

    @property
    def modes(self) -> list[str]:
        return [m for m in CONTROL_MODES if m in self.translators]

    def describe(self) -> str:
        """One line for the page: what is served, from which files, with which defaults."""
        files = sorted({os.fspath(p) for p in self.files.values()})
        where = files[0] if len(files) == 1 else f"{os.path.commonpath(files)}/..."
        if self.guidance_scale is None:
            guidance = "its learned guidance"
        else:
            guidance = f"guidance {self.guidance_scale:g}" + (" (learned, fixed)" if self.guidance_fixed else "")
        return (f"**{self.name}** ({', '.join(self.modes)}): {self.steps} steps by default, {guidance}, "
                f"{self.resolution} px; from `{where}`")


def missing_weights_message(missing: Sequence[Path]) -> str:
    """What to do when weight files are missing: build the tiny ones, or pass the real ones."""
    listed = "\n".join(f"  - {p}" for p in missing)
    return (f"the demo's weight files are missing:\n{listed}\n"
            "To try the demo on the tiny CPU models, run `make quickstart` first (it writes them under "
            f"{DEFAULT_LOGDIR}).\n"
            "To serve real models, pass their files: --student <logdir>/fcdiffusion_distill_checkpoint/"
            "student.safetensors (written by fcdiffusion_distill.py) and/or --teacher_dir <logdir> or "
            "--teacher_<mode> <file> (fcdiffusion_train.py's checkpoints).\n" + DOWNLOAD_HELP)


def weight_files(student: str | os.PathLike | None, teacher_dir: str | os.PathLike | None,
                 teachers: Mapping[str, str | os.PathLike | None]) -> tuple[Path | None, dict[str, Path]]:
    """The student file and the teacher file per mode to serve: what was named, or the quickstart's student.

    `teacher_dir` gives each mode whose `fcdiffusion_<mode>_checkpoint/last.ckpt` exists there; `teachers`
    (mode -> file) adds or replaces modes. With no teacher named the student is served, by default the
    quickstart's. Raises `MissingWeightsError` for a named file that is not there, or a teacher folder without
    any teacher.
    """
    chosen = {m: Path(p) for m, p in teachers.items() if p is not None}
    if teacher_dir is not None:
        found = {m: teacher_checkpoint(teacher_dir, m) for m in CONTROL_MODES if m not in chosen}
        present = {m: p for m, p in found.items() if p.is_file()}
        if not present and not chosen:
            raise MissingWeightsError(missing_weights_message(list(found.values())))
        chosen.update(present)
    if student is None and not chosen:
        student = student_file(DEFAULT_LOGDIR)
    student = None if student is None else Path(student)
    missing = [p for p in [student, *chosen.values()] if p is not None and not p.is_file()]
    if missing:
        raise MissingWeightsError(missing_weights_message(missing))
    return student, {m: chosen[m] for m in CONTROL_MODES if m in chosen}


# How app.py takes each kind of weights file (it has no --teacher: teachers come per mode, or from a log folder).
FLAGS = {"student": "--student", "teacher": "--teacher_<mode> (or --teacher_dir)"}


def with_flag_hint(load: Callable[..., FrequencyControlledLDM], *args: Any) -> FrequencyControlledLDM:
    """`load(*args)`, a file of the other kind reported with the app.py flag that takes it."""
    try:
        return load(*args)
    except KindMismatchError as error:
        raise KindMismatchError(f"{error} (pass it with {FLAGS.get(error.found, 'the flag of its kind')})",
                                error.found) from None


def serve_student(path: Path, device: torch.device, tiny_vae: TinyVAE | None = None) -> ServedModel:
    """The distilled student at `path`, on `device`, serving every mode it learned (at any guidance scale in its
    range if it is guidance-conditioned); with `tiny_vae` in place of its VAE's encoder, decoder or both."""
    model = with_flag_hint(load_student, path).eval().to(device)
    translator = Translator(model, tiny_vae)
    conditioned = model.guidance_conditioned
    return ServedModel(STUDENT, {m: translator for m in model.modes}, model.student_steps, model.guidance_scale,
                       model_resolution(model), {m: path for m in model.modes},
                       tuple(model.guidance_range) if conditioned else None, guidance_fixed=not conditioned,
                       max_steps=max_sampling_steps(model.model_config()))


def serve_teachers(paths: Mapping[str, Path], device: torch.device, tiny_vae: TinyVAE | None = None) -> ServedModel:
    """The teachers `paths` (mode -> file), on `device`, each checked to be the teacher of its mode (and `tiny_vae`
    in place of their VAE's encoder, decoder or both)."""
    models = {mode: with_flag_hint(load_teacher, path, mode).eval().to(device) for mode, path in paths.items()}
    first = next(iter(models.values()))
    for mode, model in models.items():
        if model_resolution(model) != model_resolution(first):
            raise ValueError(f"the {mode} teacher {paths[mode]} works at {model_resolution(model)} px, the "
                             f"{first.control_mode} teacher at {model_resolution(first)} px: serve teachers of "
                             "one size")
    return ServedModel(TEACHERS, {m: Translator(model, tiny_vae) for m, model in models.items()}, first.ddim_steps,
                       first.guidance_scale, model_resolution(first), dict(paths),
                       max_steps=max_sampling_steps(first.model_config()))


# ---- one request -----------------------------------------------------------------------------------------------
def read_photo(path: str | os.PathLike, resolution: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """The image file at `path` prepared like `test_distillation.py` prepares its inputs (EXIF orientation,
    shorter side resized to `resolution`, centre square): float32 (resolution, resolution, 3) in [-1, 1], and a
    note when the photo had to be enlarged (else "").

    Raises `DemoInputError` for a file that is not a readable image or has more than `max_pixels` pixels; the
    size is read from the header, so a huge image is refused before it is decoded.
    """
    name = Path(path).name
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise DemoInputError(too_large(width, height, max_pixels))
            image.load()
            prepared = prepare_image(ImageOps.exif_transpose(image), resolution)
    except Image.DecompressionBombError as error:  # PIL's own limit, larger than ours: the header was absurd
        raise DemoInputError(f"{name} is too large to open ({error}); the demo takes photos of at most "
                             f"{max_pixels / 1e6:g} megapixels") from error
    except DemoInputError:
        raise
    except UnidentifiedImageError as error:
        raise DemoInputError(f"{name} is not an image file the demo can read (PNG, JPEG, WebP, BMP, TIFF, ...)") \
            from error
    except Exception as error:  # a truncated or corrupt file fails while decoding: OSError, SyntaxError, ...
        raise DemoInputError(f"could not read {name} as an image: it looks damaged ({error})") from error
    note = "" if min(width, height) >= resolution else (
        f"the photo ({width}x{height}) is smaller than the model's {resolution} px: it was enlarged")
    return prepared, note


def too_large(width: int, height: int, max_pixels: int) -> str:
    return (f"the photo is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the demo's limit of "
            f"{max_pixels / 1e6:g} megapixels; downscale it first (it is resized to the model's size anyway)")


@dataclass
class Panel:
    """One picture of the result grid: uint8 (H, W, 3) and its caption."""

    image: np.ndarray
    caption: str


@dataclass
class DemoResult:
    """A request's pictures (source | decoded control | result per mode), notes, and the seconds taken: encoding
    the photo and prompt, then per mode sampling and decoding (result and control), and in total."""

    panels: list[Panel]
    seconds: dict[str, float]
    summary: str
    notes: list[str] = field(default_factory=list)


# preview(mode, step, images): a request's live preview, each `SamplingPreview` picture with the mode it belongs to
ModePreview = Callable[[str, int, np.ndarray], None]


class Request(NamedTuple):
    """A checked request (`Demo.check`): the served model, the prompt as encoded, modes, steps, guidance (None: the
    model's own, or none) and seed."""

    served: ServedModel
    prompt: str
    modes: list[str]
    steps: int
    guidance_scale: float | None
    seed: int


def as_int(value: Any, name: str, low: int, high: int) -> int:
    """`value` as an integer in [low, high], else `DemoInputError` naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise DemoInputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


class Demo:
    """The served models and the request checks; `translate` answers one request. With a tiny VAE, it stands in for
    the models' VAE (`tiny_vae.use`) and `preview` decodes a teacher's intermediate results with it."""

    def __init__(self, served: Sequence[ServedModel], device: torch.device, resolution: int | None = None,
                 max_pixels: int = MAX_PIXELS, tiny_vae: TinyVAE | None = None):
        if not served:
            raise ValueError("the demo needs a student or at least one teacher")
        if resolution is not None and (resolution < LATENT_GRID or resolution % LATENT_GRID):
            raise ValueError(f"resolution must be a positive multiple of {LATENT_GRID}, got {resolution}")
        self.served = {s.name: s for s in served}
        self.device, self.resolution, self.max_pixels, self.tiny_vae = device, resolution, max_pixels, tiny_vae

    def preview(self, sink: PreviewSink, every: int = 5) -> SamplingPreview:
        """The sampler callback that shows a teacher's predicted result every `every` steps (`SamplingPreview`),
        decoded by the tiny VAE; a `DemoInputError` without one."""
        if self.tiny_vae is None:
            raise DemoInputError("previews need a tiny VAE: start the demo with --tiny_vae")
        return SamplingPreview(self.tiny_vae, sink, every)

    def resolution_of(self, served: ServedModel) -> int:
        return self.resolution or served.resolution

    def check(self, image: str | os.PathLike | None, prompt: str | None, modes: Sequence[str] | None, model: str,
              steps: Any, guidance_scale: Any, seed: Any) -> Request:
        """Every field of a request checked (the photo is read later), by the rules `test_distillation.py` applies
        to its flags: an empty prompt is refused (`check_prompt`), a student takes the step counts and guidance scales
        its `check_sampling` allows (a fixed-w student only its own w, or none given). A `DemoInputError` says what to
        change."""
        if image is None:
            raise DemoInputError("no photo: upload one (or paste it, or pick an example below) first")
        try:
            prompt = check_prompt(prompt)
        except ValueError as error:
            raise DemoInputError(str(error)) from None
        served = self.served.get(model)
        if served is None:
            raise DemoInputError(f"unknown model {model!r}; this demo serves {', '.join(self.served)}")
        if not modes:
            raise DemoInputError("no control mode picked: tick at least one")
        unserved = [m for m in modes if m not in served.translators]
        if unserved:
            raise DemoInputError(f"the {served.name} serve(s) mode(s) {', '.join(served.modes)}, not "
                                 f"{', '.join(map(str, unserved))}")
        steps = served.steps if steps is None else as_int(steps, "steps", 1, served.max_steps)
        seed = as_int(seed, "seed", 0, 2**63 - 1)
        if guidance_scale is not None:
            try:
                guidance_scale = float(guidance_scale)
            except (TypeError, ValueError):
                raise DemoInputError(f"guidance scale must be a number, got {guidance_scale!r}") from None
        model = next(iter(served.translators.values())).model
        try:
            if isinstance(model, FCDiffusionStudent):
                guidance_scale = model.check_sampling(guidance_scale, steps=steps)
            else:
                guidance_scale = check_guidance_scale(served.guidance_scale if guidance_scale is None
                                                      else guidance_scale)
        except ValueError as error:
            raise DemoInputError(str(error)) from None
        return Request(served, prompt, [m for m in CONTROL_MODES if m in modes], steps, guidance_scale, seed)

    def translate(self, image: str | os.PathLike | None, prompt: str | None, modes: Sequence[str] | None,
                  model: str = STUDENT, steps: Any = None, guidance_scale: Any = None, seed: Any = 0,
                  preview: ModePreview | None = None, preview_every: int = 5) -> DemoResult:
        """Translate the photo file `image` with `prompt` in each of `modes` by the served `model`.

        `steps` and `guidance_scale` default to the model's own. Image 0 of `test_distillation.py --seed S` gets
        the same noise and mini_pass shuffle, so the results match the script's. `preview(mode, step, images)`
        gets the tiny VAE's picture of the predicted result every `preview_every` sampling steps (`Demo.preview`).
        """
        served, prompt, modes, steps, guidance_scale, seed = self.check(image, prompt, modes, model, steps,
                                                                        guidance_scale, seed)
        resolution = self.resolution_of(served)
        photo, note = read_photo(image, resolution, self.max_pixels)
        notes = [note] if note else []
        dropped = next(iter(served.translators.values())).dropped_tokens([prompt])[0]
        if dropped:
            notes.append(f"the prompt is {dropped} token(s) longer than the text encoder reads: its end was cut off")
        source = torch.from_numpy(photo).permute(2, 0, 1)[None]
        start = time.perf_counter()
        encoded, panels, seconds = {}, [], {"encode": 0.0}
        for mode in modes:
            translator = served.translators[mode]
            if id(translator) not in encoded:  # the student encodes once for every mode, each teacher for its own
                encode_start = time.perf_counter()
                encoded[id(translator)] = translator.encode(source, [prompt])
                synchronize(self.device)
                seconds["encode"] += time.perf_counter() - encode_start
            callback = None
            if preview is not None:
                callback = self.preview(lambda step, images, mode=mode: preview(mode, step, images), preview_every)
            mode_start = time.perf_counter()
            result = translator.translate_latents(*encoded[id(translator)], [mode], seed=[seed], control_seed=seed,
                                                  steps=steps, guidance_scale=guidance_scale, callback=callback)[mode]
            synchronize(self.device)
            seconds[mode] = time.perf_counter() - mode_start
            panels += [Panel(to_uint8(source[0]), f"{mode}: source"),
                       Panel(to_uint8(result.control[0]), f"{mode}: decoded control"),
                       Panel(to_uint8(result.image[0]), f"{mode}: result ({seconds[mode]:.2f} s)")]
        seconds["total"] = time.perf_counter() - start
        guidance = "" if guidance_scale is None else f", guidance {guidance_scale:g}"
        timings = " · ".join(f"{name} {seconds[name]:.2f} s" for name in ["encode", *modes])
        vae = "" if self.tiny_vae is None else f", tiny VAE ({self.tiny_vae.use})"
        summary = (f"**{served.name}**, {steps} steps{guidance}{vae}, seed {seed}, {resolution} px on "
                   f"{self.device.type}: {timings} · **total {seconds['total']:.2f} s**")
        return DemoResult(panels, seconds, summary, notes)


def load_demo(student: Path | None, teachers: Mapping[str, Path], device: torch.device,
              resolution: int | None = None, max_pixels: int = MAX_PIXELS, tiny_vae: TinyVAE | None = None) -> Demo:
    """Load the weight files once (see `weight_files`) and wrap them in a `Demo`; the student comes first."""
    served = []
    if student is not None:
        print(f"loading the student {student}", flush=True)
        served.append(serve_student(student, device, tiny_vae))
    if teachers:
        print(f"loading the teachers {', '.join(map(str, teachers.values()))}", flush=True)
        served.append(serve_teachers(teachers, device, tiny_vae))
    return Demo(served, device, resolution, max_pixels, tiny_vae)


# ---- the page --------------------------------------------------------------------------------------------------
def build_app(demo: Demo) -> Any:
    """The Gradio page (a `gr.Blocks`) serving `demo`; its translation endpoint is `/translate`.

    The photo reaches `translate` as the uploaded file (the event skips Gradio's preprocessing), so an
    unreadable file is reported by `read_photo` like any other bad input, as a `gr.Error` in the page.
    """
    import gradio as gr

    first = next(iter(demo.served.values()))

    def run(image: Mapping[str, Any] | None, prompt: str | None, modes: list[str] | None, model: str,
            steps: Any, guidance_scale: Any, seed: Any) -> Iterator[tuple[list[tuple[np.ndarray, str]], str]]:
        """The translation, streamed: with a tiny VAE, the predicted result every few steps, then the panels."""
        path = image.get("path") if isinstance(image, Mapping) else image
        if image is not None and path is None:
            raise gr.Error("could not read the photo: it did not arrive as a file; upload it again",
                           print_exception=False)
        served = demo.served.get(model)
        if served is not None and served.guidance_fixed and served.guidance_scale is None:
            guidance_scale = None  # the (locked) slider stands in for a w the student's file does not record
        try:
            for item in translate_streaming(demo, path, prompt, modes, model, steps, guidance_scale, seed):
                if isinstance(item, DemoResult):
                    for note in item.notes:
                        gr.Warning(note)
                    yield [(p.image, p.caption) for p in item.panels], item.summary
                else:
                    mode, step, images = item
                    yield [(images[0], f"{mode}: step {step} (tiny VAE preview)")], f"sampling {mode}: step {step}"
        except DemoInputError as error:  # shown as text: no HTML escaping, which the page would show as entities
            raise gr.Error(str(error), print_exception=False) from error

    def pick_model(name: str) -> tuple[Any, Any, Any]:
        served = demo.served[name]  # a fixed-w student's slider shows its own w, which it alone takes
        return (gr.CheckboxGroup(choices=served.modes, value=served.modes),
                gr.Slider(value=served.steps),
                gr.Slider(value=served.guidance_scale or 1.0, interactive=not served.guidance_fixed))

    with gr.Blocks(title="FCDiffusion demo", analytics_enabled=False) as app:
        gr.Markdown("## FCDiffusion: frequency-controlled image-to-image translation\n"
                    "Upload a photo or pick an example, describe the picture you want and press **Translate**. Each "
                    "control mode keeps one frequency band of the photo (the *decoded control*) and lets the prompt "
                    "redraw the rest: " + "; ".join(f"`{m}` {task}" for m, task in MODE_TASKS.items()) + ".  \n"
                    + "  \n".join(s.describe() for s in demo.served.values())
                    + f"  \nPhotos are centre-cropped to a square; at most {demo.max_pixels / 1e6:g} megapixels.")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="photo", type="filepath", format="png", sources=["upload", "clipboard"],
                                 height=240)
                prompt = gr.Textbox(label="prompt", lines=2, placeholder="e.g. a watercolor painting of a cat")
                model = gr.Radio(list(demo.served), value=first.name, label="model", visible=len(demo.served) > 1)
                modes = gr.CheckboxGroup(first.modes, value=first.modes, label="control modes")
                with gr.Row():
                    steps = gr.Slider(1, max(100, *(s.steps for s in demo.served.values())), value=first.steps,
                                      step=1, label="sampling steps")
                    guidance = gr.Slider(1.0, 20.0, value=first.guidance_scale or 1.0, step=0.5,
                                         interactive=not first.guidance_fixed, label="guidance scale",
                                         info="teachers, or a guidance-conditioned student; a fixed-w student "
                                              "samples at the w it learned")
                seed = gr.Number(0, precision=0, minimum=0, label="seed")
                button = gr.Button("Translate", variant="primary")
                gr.Examples([[Image.fromarray(load_photo(n)), CAPTIONS[n]] for n in EXAMPLES], [image, prompt],
                            label="example photos (scikit-image)", examples_per_page=4)
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="source | decoded control | result, per mode", columns=3, format="png",
                                     object_fit="contain", elem_classes="result-gallery")
                timing = gr.Markdown(label="time taken")
        model.change(pick_model, model, [modes, steps, guidance], api_visibility="private")
        button.click(run, [image, prompt, modes, model, steps, guidance, seed], [gallery, timing],
                     api_name="translate", preprocess=False)
    return app


def translate_streaming(demo: Demo, *request: Any) -> Iterator[tuple[str, int, np.ndarray] | DemoResult]:
    """`demo.translate(*request)` in a worker thread, yielding its previews (mode, step, images) as they come (with
    a tiny VAE) and then its `DemoResult`; the translation's error, if any, is raised here."""
    if demo.tiny_vae is None:
        yield demo.translate(*request)
        return
    items: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = demo.translate(*request, preview=lambda *frame: items.put(frame))
        except BaseException as error:  # handed to the caller's thread, which raises it
            outcome["error"] = error
        finally:
            items.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := items.get()) is not None:
        yield item
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["result"]


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True) -> str:
    """Serve `app` on host:port (and a public link with `share`); returns the local URL. `block=False` returns
    at once, leaving the server running until `app.close()`. Raises a `RunError` when it cannot serve there."""
    app.queue(default_concurrency_limit=1)  # one translation at a time: the models are shared
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                               show_error=True, max_file_size=MAX_UPLOAD, ssr_mode=False, css=CSS,
                               footer_links=["api"])
    except OSError as error:
        raise RunError(f"cannot serve on {host}:{port} ({error}); pick another --port") from error
    return url
