"""The multi-condition playground: ipywidgets over ``cnkit.generation.generate``.

``Playground(base, controlnets)`` builds the UI: control units that can be added and removed, each with a source
(a toy-world scene or an uploaded image) shown beside its condition map, an annotator and its settings, a
ControlNet, scale, start/end and control mode; the prompt (it starts as the scene's own prompt, with a hint of the
words the base understands), negative prompt, steps, guidance and seed; a Generate button with a status line; a
live preview of the denoising; the result. Nothing loads a model until Generate is pressed.

What the first click gives must make sense, and every state shown must be true:

- each unit starts on the net trained on its annotator's kind of map (read from the nets' cards, not their
  names: ``cnkit.experiments.shipped.matching_net``), and says, in the unit, when the chosen net was trained on
  another kind of condition; nets are picked by short name, or by a path for one's own;
- a message belongs to the widget that caused it and is cleared when that widget is fixed (settings are read
  when the user finishes: Enter or leaving the field, not at every key);
- the status is loading the pipeline, step k/n, done in s, or the failure; the result pane is emptied when a run
  starts and stays empty after a failure.

``playground.generate()`` does what the button does, so a headless run (papermill, CI) drives the same state.
"""

from __future__ import annotations

import html
import io
import json
import time
import traceback
import warnings
from pathlib import Path

import ipywidgets as w
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..colours import COLOUR_NAMES, X11_WORDS
from ..data import toyworld
from ..data.splits import VALIDATION
from ..experiments.shipped import matching_net, net_choices, trained_on
from ..generation import annotators
from ..generation.generate import ControlUnit, generate, unknown_words_note
from ..generation.weighting import CONTROL_MODES
from ..geometry import SHAPE_KINDS
from ..models import bases
from ..models.vocabulary import known_words, word_list_tokenizer
from ..params import repo_path
from ..pixels import WHITE, from_model_range, to_rgb

MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "controlnet": "ControlNet is more important"}
OWN = "your own folder or file..."  # the net list's last entry: a path field appears
PREVIEW = 112  # px of the source and condition previews
RESULT = 192  # px of the generated image
LABEL = {"description_width": "78px"}
DEFAULT_SCENE = ("shapes", VALIDATION)  # a held-out scene: no shipped net trained on it


def png_bytes(image, size: int = 128) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def show_image(widget: w.Image, image, size: int) -> None:
    """Show ``image`` in ``widget``, or hide the widget (None): an empty image widget draws a broken-image icon."""
    if image is None:
        widget.layout.display = "none"
        widget.value = b""
    else:
        widget.value = png_bytes(image, size)
        widget.layout.display = ""


def message(kind: str, text: str) -> str:
    """A message line: ``error`` (red), ``warning`` (amber), ``note`` (grey)."""
    colour = {"error": "#b00020", "warning": "#8a5300", "note": "#555"}[kind]
    mark = {"error": "\u2716 ", "warning": "\u26a0 ", "note": ""}[kind]
    return (f"<div style='color:{colour};white-space:normal;line-height:1.3;font-size:12px'>{mark}"
            f"{html.escape(text)}</div>")


def _short_name(folder: str) -> str:
    p = Path(folder)
    return p.parent.name if p.name == "checkpoint" else p.name


class UnitPanel:
    """One control unit's widgets, its messages and its state."""

    def __init__(self, playground: Playground, scene: tuple[str, int], annotator: str = "toy_segmentation"):
        self.pg = playground
        self.net_auto = True  # the net follows the annotator until the user picks one
        self._quiet = False  # set while the panel changes its own widgets
        self.title = w.HTML()
        self.remove = w.Button(description="Remove", icon="trash", layout=w.Layout(width="96px"))
        self.remove.on_click(lambda _: playground.remove_unit(self))
        self.source_kind = w.ToggleButtons(options=["toy world", "upload"], value="toy world", description="source",
                                           style={**LABEL, "button_width": "100px"})
        self.world = w.Dropdown(options=list(toyworld.WORLDS), value=scene[0], description="world",
                                style={"description_width": "78px"}, layout=w.Layout(width="175px"))
        self.index = w.BoundedIntText(value=scene[1], min=0, max=2**31 - 1, description="scene",
                                      style={"description_width": "44px"}, layout=w.Layout(width="165px"))
        self.toy_box = w.HBox([self.world, self.index])
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="image")
        self.upload_box = w.HBox([self.upload], layout=w.Layout(display="none"))
        self.annotator = w.Dropdown(options=annotators.names(available_only=True), value=annotator,
                                    description="annotator", style=LABEL, layout=w.Layout(width="330px"))
        self.settings = w.Text(value="", continuous_update=False, description="settings", style=LABEL,
                               layout=w.Layout(width="330px"))
        self.settings_hint = w.HTML()
        self.source_image = w.Image(format="png", width=PREVIEW, height=PREVIEW)
        self.condition_image = w.Image(format="png", width=PREVIEW, height=PREVIEW)
        self.source_caption, self.condition_caption = w.HTML(), w.HTML()
        self.source_message = w.HTML()  # what went wrong with the source, settings or preview
        self.source_message.add_class("cnkit-unit-message")
        names = list(playground.choices) + [OWN]
        self.net = w.Dropdown(options=names, value=names[0], description="ControlNet", style=LABEL,
                              layout=w.Layout(width="330px"))
        self.net_path = w.Text(value="", continuous_update=False, description="path", style=LABEL,
                               placeholder="a ControlNet folder, .safetensors file or hub id",
                               layout=w.Layout(width="330px", display="none"))
        self.net_message = w.HTML()  # what the net was trained on, and whether that fits this unit
        self.net_message.add_class("cnkit-net-message")
        self.scale = w.FloatSlider(value=1.0, min=0, max=2, step=0.05, description="scale", style=LABEL,
                                   layout=w.Layout(width="340px"))
        self.start_end = w.FloatRangeSlider(value=(0.0, 1.0), min=0, max=1, step=0.05, description="start/end",
                                            style=LABEL, layout=w.Layout(width="340px"))
        self.mode = w.Dropdown(options=[(MODE_LABELS[m], m) for m in CONTROL_MODES], value="balanced",
                               description="mode", style=LABEL, layout=w.Layout(width="330px"))
        previews = w.HBox([w.VBox([self.source_caption, self.source_image]),
                           w.VBox([self.condition_caption, self.condition_image])])
        self.box = w.VBox([w.HBox([self.title, self.remove], layout=w.Layout(justify_content="space-between")),
                           self.source_kind, self.toy_box, self.upload_box, self.annotator, self.settings,
                           self.settings_hint, previews, self.source_message, self.net, self.net_path,
                           self.net_message, self.scale, self.start_end, self.mode],
                          layout=w.Layout(border="1px solid #bbb", padding="6px", margin="3px", width="370px"))
        self.box.add_class("cnkit-unit")
        for widget, name in ((self.annotator, "annotator"), (self.settings, "settings"), (self.net, "net"),
                             (self.net_path, "net-path"), (self.source_image, "source-image"),
                             (self.condition_image, "condition-image"), (self.world, "world"),
                             (self.index, "scene")):
            widget.add_class(f"cnkit-{name}")  # what the browser test finds
        self.source_kind.observe(self._on_source_kind, names="value")
        for widget in (self.world, self.index):
            widget.observe(self._on_scene, names="value")
        self.upload.observe(lambda _: self.refresh_preview(), names="value")
        self.annotator.observe(self._on_annotator, names="value")
        self.settings.observe(lambda _: None if self._quiet else self.refresh_preview(), names="value")
        self.net.observe(self._on_net, names="value")
        self.net_path.observe(lambda _: self.check_net(), names="value")
        self._describe_settings()
        self.follow_annotator()

    # --- state -------------------------------------------------------------------------------------------------

    @property
    def scene(self) -> tuple[str, int] | None:
        """The toy-world scene this unit shows, or None when its source is an upload."""
        return (self.world.value, int(self.index.value)) if self.source_kind.value == "toy world" else None

    def set_scene(self, scene: tuple[str, int]) -> None:
        self._quiet = True
        try:
            self.world.value, self.index.value = scene
        finally:
            self._quiet = False
        self.refresh_preview()

    def source(self):
        if self.source_kind.value == "upload":
            files = self.upload.value
            if not files:
                raise ValueError("upload an image for this unit, or choose a toy-world scene as its source")
            item = files[0] if isinstance(files, tuple | list) else next(iter(files.values()))
            try:
                with Image.open(io.BytesIO(bytes(item["content"]))) as img:
                    img.load()
                    return np.asarray(to_rgb(img, WHITE)[0])  # as a viewer shows it, as generation reads sources
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"the uploaded file {item.get('name', '')!r} is not an image PIL can read ({e}); "
                                 "upload a PNG or JPEG") from None
        return toyworld.sample(self.world.value, int(self.index.value))

    def annotator_settings(self) -> dict:
        text = self.settings.value.strip()
        try:
            settings = json.loads(text) if text else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"settings are not JSON ({e.msg} at character {e.pos + 1}); write them like "
                             f"{self._example()}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"settings must be a JSON object, like {self._example()}")
        return settings

    def condition(self) -> np.ndarray:
        return annotators.annotate(self.annotator.value, self.source(), **self.annotator_settings())

    def controlnet(self) -> str:
        """The chosen net's folder, file or hub id."""
        if self.net.value == OWN:
            path = self.net_path.value.strip()
            if not path:
                raise ValueError("type the path of your ControlNet (a folder, an original-layout .safetensors file "
                                 "or a hub id) into the path field, or pick a net from the list")
            return path
        return self.pg.choices[self.net.value]

    def unit(self) -> ControlUnit:
        """The unit as ``generate`` takes it; what is wrong is also shown by the widget it concerns."""
        try:
            net = self.controlnet()
        except ValueError as e:
            self.net_message.value = message("error", str(e))
            raise
        try:
            condition = self.condition()
        except Exception as e:
            self.source_message.value = message("error", str(e))
            raise
        start, end = self.start_end.value
        return ControlUnit(net, condition, scale=self.scale.value, start=start, end=end, mode=self.mode.value)

    # --- reactions ---------------------------------------------------------------------------------------------

    def _on_source_kind(self, _change) -> None:
        upload = self.source_kind.value == "upload"
        self.toy_box.layout.display = "none" if upload else ""
        self.upload_box.layout.display = "" if upload else "none"
        if upload and self.annotator.value.startswith("toy_"):  # toy maps read a scene's geometry, not pixels
            self.annotator.value = "canny"  # refreshes the preview
        else:
            self.refresh_preview()
        self.pg.scene_changed(self)

    def _on_scene(self, _change) -> None:
        if self._quiet:
            return
        kind = self.annotator.value.removeprefix("toy_")
        if self.annotator.value.startswith("toy_") and kind not in toyworld.CONDITIONS[self.world.value]:
            self.annotator.value = "toy_" + toyworld.CONDITIONS[self.world.value][0]  # refreshes, follows
        else:
            self.follow_annotator()
            self.refresh_preview()
        self.pg.scene_changed(self)

    def _on_annotator(self, _change) -> None:
        self._describe_settings()
        self._quiet = True
        try:
            self.settings.value = ""  # the old annotator's settings would not fit
        finally:
            self._quiet = False
        self.follow_annotator()
        self.refresh_preview()

    def _on_net(self, _change) -> None:
        if not self._quiet:
            self.net_auto = False  # the user chose: the annotator no longer moves it
        self.net_path.layout.display = "" if self.net.value == OWN else "none"
        self.check_net()

    def follow_annotator(self) -> None:
        """While the user has not picked a net: the net trained on this annotator's kind of map (from the cards),
        of this scene's world first."""
        if self.net_auto:
            kind = annotators.info_for(self.annotator.value).kind
            best = matching_net(self.pg.choices, kind, self.scene[0] if self.scene else None)
            if best is not None and best != self.net.value:
                self._quiet = True
                try:
                    self.net.value = best
                finally:
                    self._quiet = False
        self.check_net()

    def _example(self) -> str:
        info = annotators.info_for(self.annotator.value)
        return info.example or "{" + ", ".join(f'"{s}": ...' for s in info.settings) + "}"

    def _describe_settings(self) -> None:
        info = annotators.info_for(self.annotator.value)
        if info.settings:
            self.settings.disabled = False
            self.settings.placeholder = self._example()
            hint = (f"{info.name} draws {info.kind} maps; settings it accepts: {', '.join(info.settings)} "
                    "(JSON; Enter applies)")
        else:
            self.settings.disabled = True
            self.settings.placeholder = f"{info.name} has no settings"
            hint = f"{info.name} draws {info.kind} maps" + (" from a toy-world scene's exact geometry"
                                                              if info.name.startswith("toy_") else "")
        self.settings_hint.value = message("note", hint)

    def refresh_preview(self) -> None:
        """The source and its condition map, or the reason there are none (never a stale preview)."""
        try:
            source = self.source()
        except Exception as e:  # shown in the unit; fixed by the user, it clears
            self._previews(None, None, f"source: {e}")
            return
        picture = source.image if isinstance(source, toyworld.Sample) else source
        try:
            condition = annotators.annotate(self.annotator.value, source, **self.annotator_settings())
        except Exception as e:
            self._previews(picture, None, f"{self.annotator.value}: {e}")
            return
        self._previews(picture, condition, None)

    def _previews(self, picture, condition, error: str | None) -> None:
        scene = self.scene
        self.source_caption.value = message("note", f"{scene[0]} scene {scene[1]}" if scene else "uploaded image")
        self.condition_caption.value = message("note", f"condition: {annotators.info_for(self.annotator.value).kind}")
        show_image(self.source_image, picture, PREVIEW)
        show_image(self.condition_image, condition, PREVIEW)
        self.source_message.value = message("error", error) if error else ""
        self.check_net()

    def check_net(self) -> None:
        """What the chosen net was trained on (its card), and a warning when that is not this unit's kind of map; a
        path that holds nothing says so."""
        if self.net.value == OWN:
            path = self.net_path.value.strip()
            if not path:
                self.net_message.value = message("note", "type the path of your ControlNet above")
                return
            folder = repo_path(path)
            if not folder.exists() and not (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
                hint = f"; {path} is in the list above" if path in self.pg.choices else ""
                self.net_message.value = message("error", f"no ControlNet at {path} (no such folder or file){hint}")
                return
        else:
            folder = self.pg.choices[self.net.value]
        made = trained_on(folder)
        kind = annotators.info_for(self.annotator.value).kind
        if made is None:
            self.net_message.value = message("note", "its card does not say what it was trained on")
        elif made.conditions and kind not in made.conditions:
            better = matching_net(self.pg.choices, kind, self.scene[0] if self.scene else None)
            self.net_message.value = message(
                "warning", f"this net was trained on {made.describe()}, but this unit gives it a {kind} map: it "
                           "will not follow it. " + (f"Choose {better}, trained on {kind} maps." if better else
                                                     f"No net here was trained on {kind} maps."))
            self.net_message.remove_class("cnkit-net-ok")
            self.net_message.add_class("cnkit-net-warning")
            return
        elif self.scene and made.world and made.world != self.scene[0]:
            self.net_message.value = message(
                "note", f"trained on {made.describe()}; this scene is from the {self.scene[0]} world")
        else:
            self.net_message.value = message("note", f"trained on {made.describe()} (from its card)")
        self.net_message.remove_class("cnkit-net-warning")
        self.net_message.add_class("cnkit-net-ok")


class Playground:
    """The UI (``.ui``) and its state; ``generate()`` is the Generate button's action."""

    def __init__(self, base: str = "data/tiny-sd", controlnets: list[str] | None = None, units: int = 1,
                 scene: tuple[str, int] = DEFAULT_SCENE):
        self.base = base
        self.choices = (net_choices() if controlnets is None
                        else {_short_name(str(c)): str(c) for c in controlnets})
        self.units: list[UnitPanel] = []
        self.result = None
        self._scene = tuple(scene)
        self._auto_prompt = ""  # the prompt the playground last wrote (the user has not edited it while it matches)
        self.error = w.HTML()
        self.error.add_class("cnkit-error")
        wide = w.Layout(width="760px")
        self.prompt = w.Text(value="", continuous_update=False, description="prompt", style=LABEL, layout=wide)
        self.prompt.add_class("cnkit-prompt")
        self.prompt_hint = w.HTML(layout=wide)
        self.prompt_message = w.HTML(layout=wide)
        self.prompt_message.add_class("cnkit-prompt-message")
        self.negative = w.Text(value="", continuous_update=False, description="negative", style=LABEL, layout=wide)
        self.steps = w.IntSlider(value=20, min=1, max=100, description="steps", style=LABEL)
        self.guidance = w.FloatSlider(value=3.0, min=1.0, max=15.0, step=0.5, description="guidance", style=LABEL)
        self.seed = w.IntText(value=0, description="seed", style=LABEL, layout=w.Layout(width="200px"))
        self.add = w.Button(description="Add unit", icon="plus")
        self.add.on_click(lambda _: self.add_unit())
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.button.add_class("cnkit-generate")
        self.button.on_click(lambda _: self.generate())
        self.status = w.HTML(message("note", "press Generate (the first run loads the pipeline: a few seconds)"))
        self.status.add_class("cnkit-status")
        self.live = w.Image(format="png", width=RESULT, height=RESULT, layout=w.Layout(display="none"))
        self.live_caption = w.HTML()
        self.results = w.HBox()
        self.results.add_class("cnkit-results")
        self.units_box = w.Box(layout=w.Layout(display="flex", flex_flow="row wrap", flex="0 1 auto"))
        outputs = w.VBox([w.HBox([self.button, self.add]), self.status, self.error,
                          w.HBox([w.VBox([self.live_caption, self.live]), self.results])],
                         layout=w.Layout(width="430px", margin="3px 0 0 8px"))
        self.ui = w.VBox([
            self.prompt, self.prompt_hint, self.prompt_message, self.negative,
            w.HBox([self.steps, self.guidance, self.seed]),
            w.HBox([self.units_box, outputs], layout=w.Layout(align_items="flex-start"))])
        self.ui.add_class("cnkit-playground")
        self.prompt.observe(lambda _: self.check_prompt(), names="value")
        self.negative.observe(lambda _: self.check_prompt(), names="value")
        self._hint()
        for _ in range(units):
            self.add_unit()
        self._follow_scene()

    # --- units ---------------------------------------------------------------------------------------------------

    def add_unit(self, annotator: str | None = None) -> UnitPanel:
        """A new unit on the scene the other units show (so two maps of one scene compose without a hand edit)."""
        scene = self.units[-1].scene if self.units and self.units[-1].scene else self._scene
        panel = UnitPanel(self, scene, annotator or "toy_segmentation")
        self.units.append(panel)
        self._layout_units()
        panel.refresh_preview()
        return panel

    def remove_unit(self, panel: UnitPanel) -> None:
        self.units.remove(panel)
        self._layout_units()

    def _layout_units(self) -> None:
        for k, panel in enumerate(self.units):
            panel.title.value = f"<b>Unit {k + 1}</b>"
        self.units_box.children = [u.box for u in self.units]

    def scene_changed(self, panel: UnitPanel) -> None:
        """The first unit's scene is the shared one: units that showed the old scene follow it, and the prompt
        follows it while the user has not written one of their own."""
        if not self.units or panel is not self.units[0]:
            return
        old, new = self._scene, panel.scene
        if new is None:
            return
        self._scene = new
        for other in self.units[1:]:
            if other.scene == old:
                other.set_scene(new)
        self._follow_scene()

    def _follow_scene(self) -> None:
        if self.prompt.value.strip() in ("", self._auto_prompt):
            scene = self.units[0].scene if self.units else None
            prompt = toyworld.sample(*scene).prompt if scene else ""
            self._auto_prompt = prompt
            self.prompt.value = prompt

    # --- the prompt ----------------------------------------------------------------------------------------------

    def _tokenizer(self):
        """The base's tokenizer, without loading the model (None where it cannot be read yet)."""
        if not hasattr(self, "_tok"):
            self._tok = None
            try:
                from transformers import CLIPTokenizer

                folder = repo_path(self.base) / "tokenizer"
                if folder.is_dir():
                    self._tok = CLIPTokenizer.from_pretrained(str(folder))
            except Exception:  # noqa: BLE001 - a hint only; generation says what is wrong with the base
                self._tok = None
        return self._tok

    def _hint(self) -> None:
        tok = self._tokenizer()
        if tok is None or not word_list_tokenizer(tok):
            self.prompt_hint.value = message("note", "the prompt starts as the scene's own; any words this base's "
                                                     "text encoder reads")
            return
        known = known_words(tok, toyworld.VOCABULARY)
        colours = [c for c in known if c in COLOUR_NAMES or c in X11_WORDS]
        shapes = [c for c in known if c in SHAPE_KINDS]
        other = [c for c in known if c not in colours and c not in shapes and c.isalpha()]
        shown = ", ".join(colours[:10]) + (f" and {len(colours) - 10} more" if len(colours) > 10 else "")
        self.prompt_hint.value = message(
            "note", f"This base understands only the words it was trained on: colours ({shown}), shapes "
                    f"({', '.join(shapes)}) and {', '.join(other)}. Its prompts read like \"red circle with blue "
                    "background\" or \"purple triangle and yellow square on black background\"; the prompt starts "
                    "as the scene's own.")

    def check_prompt(self) -> None:
        tok = self._tokenizer()
        note = unknown_words_note(tok, [self.prompt.value, self.negative.value]) if tok is not None else None
        self.prompt_message.value = message("warning", note) if note else ""

    # --- generation ----------------------------------------------------------------------------------------------

    def _status(self, kind: str, text: str) -> None:
        self.status.value = message(kind, text)

    def _preview(self, pipe, start: float):
        def on_step(step, total, latents):
            with torch.no_grad():
                image = pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor).sample
            show_image(self.live, from_model_range(image)[0], RESULT)
            self.live_caption.value = message("note", f"denoising: step {step} of {total}")
            self._status("note", f"generating: step {step}/{total} ({time.perf_counter() - start:.1f} s)")
        return on_step

    def generate(self):
        """Generate with the current state: the result to the result pane, the status always true, an error to the
        widget that caused it (or below the button)."""
        start = time.perf_counter()
        self.error.value = ""
        self.result = None
        self.results.children = []
        show_image(self.live, None, RESULT)
        self.live_caption.value = ""
        self.button.disabled = True
        try:
            units = []
            for k, panel in enumerate(self.units):
                try:
                    units.append(panel.unit())
                except Exception as e:  # the unit shows it too
                    raise ValueError(f"unit {k + 1}: {e}") from e
            if not bases.is_loaded(self.base):
                self._status("note", f"loading the pipeline ({self.base}): a few seconds, once")
            pipe = bases.load_pipeline(self.base)
            self._status("note", "loading the ControlNets and starting")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what a user should know is in the result's notes
                self.result = generate(pipe, self.prompt.value, units, negative_prompt=self.negative.value,
                                       steps=self.steps.value, guidance=self.guidance.value, seed=self.seed.value,
                                       on_step=self._preview(pipe, start))
            images = [w.Image(value=png_bytes(im, RESULT), format="png", width=RESULT, height=RESULT)
                      for im in self.result.images]
            for im in images:
                im.add_class("cnkit-result")
            self.results.children = [w.VBox([w.HTML(message("note", "result")), *images])]
            notes = self.result.notes
            self._status("warning" if notes else "note",
                         f"done in {time.perf_counter() - start:.1f} s" + ("; " + "; ".join(notes) if notes else ""))
            self.status.add_class("cnkit-done")
        except Exception as e:  # shown where the user looks; the traceback folded away
            self.result = None
            self.results.children = []
            self.status.remove_class("cnkit-done")
            self._status("error", f"failed after {time.perf_counter() - start:.1f} s: see below")
            tb = html.escape("".join(traceback.format_exc().splitlines(True)[-8:]))
            self.error.value = (message("error", f"{type(e).__name__}: {e}")
                                + f"<details><summary>traceback</summary><pre>{tb}</pre></details>")
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
