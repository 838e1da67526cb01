"""The multi-condition playground: ipywidgets over ``cnkit.generation.generate``.

``Playground(base, controlnets)`` builds the UI: control units that can be added and removed, each
with a source (an uploaded image or a toy-world sample), an annotator and its settings with a preview
of the condition map, a ControlNet, scale, start/end and control mode; the prompt, negative prompt,
steps, guidance and seed; a Generate button; a live preview of the denoising; the result grid; and
an error line (errors are shown in the UI, never lost in a log). Nothing loads a model until
Generate is pressed. ``playground.generate()`` does what the button does, so a headless run
(papermill, CI) drives the same state.
"""

from __future__ import annotations

import io
import json
import traceback
from pathlib import Path

import ipywidgets as w
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data import toyworld
from ..generation import annotators
from ..generation.generate import ControlUnit, generate
from ..generation.weighting import CONTROL_MODES
from ..models.bases import load_pipeline
from ..params import repo_path
from ..pixels import WHITE, from_model_range, to_rgb

MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "controlnet": "ControlNet is more important"}


def png_bytes(image, size: int = 128) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def shipped_controlnets(root="data/controlnets") -> list[str]:
    """Folders under ``root`` that hold a ControlNet (config.json and weights)."""
    root = repo_path(root)
    return sorted(str(p.parent) for p in root.glob("*/config.json")) if root.is_dir() else []


class UnitPanel:
    """One control unit's widgets."""

    def __init__(self, index: int, controlnets: list[str], on_remove, on_error):
        self.on_error = on_error
        self.title = w.HTML(f"<b>Unit {index}</b>")
        self.source_kind = w.ToggleButtons(options=["toy world", "upload"], value="toy world",
                                           description="source")
        self.world = w.Dropdown(options=list(toyworld.WORLDS), value="shapes", description="world")
        self.index = w.BoundedIntText(value=index, min=0, max=10**9, description="sample")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="image")
        self.annotator = w.Dropdown(options=annotators.names(available_only=True), value="toy_segmentation",
                                    description="annotator")
        self.settings = w.Text(value="{}", description="settings", placeholder='{"low_threshold": 100}')
        self.preview = w.Image(format="png", width=128, height=128)
        options = controlnets or ["(type a folder or hub id)"]
        self.controlnet = w.Combobox(options=controlnets, value=options[0] if controlnets else "",
                                     description="ControlNet", ensure_option=False)
        self.scale = w.FloatSlider(value=1.0, min=0, max=2, step=0.05, description="scale")
        self.start_end = w.FloatRangeSlider(value=(0.0, 1.0), min=0, max=1, step=0.05, description="start/end")
        self.mode = w.Dropdown(options=[(MODE_LABELS[m], m) for m in CONTROL_MODES], value="balanced",
                               description="mode")
        self.remove = w.Button(description="Remove unit", icon="trash")
        self.remove.on_click(lambda _: on_remove(self))
        for widget in (self.source_kind, self.world, self.index, self.upload, self.annotator, self.settings):
            widget.observe(lambda _change: self.refresh_preview(), names="value")
        self.box = w.VBox([self.title, self.source_kind, w.HBox([self.world, self.index]), self.upload,
                           w.HBox([self.annotator, self.settings]), self.preview, self.controlnet, self.scale,
                           self.start_end, self.mode, self.remove],
                          layout=w.Layout(border="1px solid #ccc", padding="4px", margin="2px"))
        self.box.add_class("cnkit-unit")

    def source(self):
        if self.source_kind.value == "upload":
            files = self.upload.value
            if not files:
                raise ValueError("upload an image for this unit, or choose a toy-world sample as its source")
            item = files[0] if isinstance(files, (tuple, list)) else next(iter(files.values()))
            try:
                with Image.open(io.BytesIO(bytes(item["content"]))) as img:
                    img.load()
                    return np.asarray(to_rgb(img, WHITE)[0])  # as a viewer shows it, as generation reads sources
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"the uploaded file {item.get('name', '')!r} is not an image PIL can read ({e}); "
                                 "upload a PNG or JPEG") from None
        return toyworld.sample(self.world.value, int(self.index.value))

    def annotator_settings(self) -> dict:
        try:
            settings = json.loads(self.settings.value or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"annotator settings must be JSON, e.g. {{\"low_threshold\": 50}}: {e}") from None
        if not isinstance(settings, dict):
            raise ValueError("annotator settings must be a JSON object, e.g. {\"low_threshold\": 50}")
        return settings

    def condition(self) -> np.ndarray:
        return annotators.annotate(self.annotator.value, self.source(), **self.annotator_settings())

    def refresh_preview(self) -> None:
        try:
            self.preview.value = png_bytes(self.condition())
        except Exception as e:  # shown in the UI: the user fixes the unit and the preview follows
            self.on_error(f"unit preview: {e}")

    def unit(self) -> ControlUnit:
        start, end = self.start_end.value
        if not self.controlnet.value.strip():
            raise ValueError("choose a ControlNet for every unit (a folder such as data/controlnets/... or a hub id)")
        return ControlUnit(self.controlnet.value.strip(), self.condition(), scale=self.scale.value, start=start,
                           end=end, mode=self.mode.value)


class Playground:
    """The UI (``.ui``) and its state; ``generate()`` is the Generate button's action."""

    def __init__(self, base: str = "data/tiny-sd", controlnets: list[str] | None = None, units: int = 1):
        self.base = base
        self.controlnets = shipped_controlnets() if controlnets is None else list(controlnets)
        self.units: list[UnitPanel] = []
        self.result = None
        self.error = w.HTML()
        self.error.add_class("cnkit-error")
        self.prompt = w.Text(value="", description="prompt", layout=w.Layout(width="60%"))
        self.negative = w.Text(value="", description="negative", layout=w.Layout(width="60%"))
        self.steps = w.IntSlider(value=20, min=1, max=100, description="steps")
        self.guidance = w.FloatSlider(value=3.0, min=1.0, max=15.0, step=0.5, description="guidance")
        self.seed = w.IntText(value=0, description="seed")
        self.add = w.Button(description="Add unit", icon="plus")
        self.add.on_click(lambda _: self.add_unit())
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.button.add_class("cnkit-generate")
        self.button.on_click(lambda _: self.generate())
        self.live = w.Image(format="png", width=128, height=128)
        self.status = w.HTML()
        self.results = w.HBox()
        self.results.add_class("cnkit-results")
        self.units_box = w.HBox()
        self.ui = w.VBox([w.HBox([self.add]), self.units_box, self.prompt, self.negative,
                          w.HBox([self.steps, self.guidance, self.seed]), w.HBox([self.button, self.status]),
                          self.error, w.HBox([w.VBox([w.HTML("denoising"), self.live]),
                                              w.VBox([w.HTML("result"), self.results])])])
        for _ in range(units):
            self.add_unit()

    def show_error(self, message: str) -> None:
        self.error.value = f"<pre style='color:#b00'>{message}</pre>"

    def add_unit(self) -> UnitPanel:
        panel = UnitPanel(len(self.units), self.controlnets, self.remove_unit, self.show_error)
        self.units.append(panel)
        self.units_box.children = [u.box for u in self.units]
        panel.refresh_preview()
        return panel

    def remove_unit(self, panel: UnitPanel) -> None:
        self.units.remove(panel)
        self.units_box.children = [u.box for u in self.units]

    def _preview(self, pipe):
        def on_step(step, total, latents):
            with torch.no_grad():
                image = pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor).sample
            array = from_model_range(image)[0]
            self.live.value = png_bytes(array)
            self.status.value = f"step {step}/{total}"
        return on_step

    def generate(self):
        """Generate with the current state; errors go to the error line, the result to the grid."""
        self.error.value = ""
        self.button.disabled = True
        try:
            units = [u.unit() for u in self.units]
            pipe = load_pipeline(self.base)
            self.result = generate(pipe, self.prompt.value, units, negative_prompt=self.negative.value,
                                   steps=self.steps.value, guidance=self.guidance.value, seed=self.seed.value,
                                   on_step=self._preview(pipe))
            images = [w.Image(value=png_bytes(im), format="png", width=128, height=128) for im in self.result.images]
            for im in images:
                im.add_class("cnkit-result")
            self.results.children = images
            self.status.value = "done" + ("; " + "; ".join(self.result.notes) if self.result.notes else "")
        except Exception as e:  # shown where the user looks, with the traceback's last lines
            self.show_error(f"{type(e).__name__}: {e}\n\n" + "".join(traceback.format_exc().splitlines(True)[-6:]))
            self.result = None
        finally:
            self.button.disabled = False
        return self.result

    def save(self, out_dir) -> list[Path]:
        """The last result's images and each unit's condition, as PNG files in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.result is None:
            raise RuntimeError(f"nothing generated yet; the UI says: {self.error.value or 'press Generate'}")
        paths = []
        for k, im in enumerate(self.result.images):
            paths.append(out / f"image_{k}.png")
            im.save(paths[-1])
        for k, cond in enumerate(self.result.conditions):
            paths.append(out / f"condition_{k}.png")
            cond.save(paths[-1])
        return paths
