"""The kit's real path at Stable Diffusion 1.5's scale, on a CPU (issue 14).

``cnkit.models.sd15`` builds a base with SD 1.5's exact architecture (860M-parameter UNet, 768-wide CLIP ViT-L/14 text
tower, 8x VAE) and random weights. Here it goes through what a user does with real SD 1.5: save and load it with the
stock pipeline, train a ControlNet with ``python -m cnkit.training.train`` (telemetry and validation callbacks
attached, as
the CLI does), resume, load the checkpoint with the stock ``ControlNetModel``, generate from two control units, and
run the validation hook once. Images are 128 px (latents 16x16) so that it runs in minutes on 2 CPU cores; the
shapes are SD's. Training peaks at about 13.5 GiB RSS on a CPU (fp32 weights, gradients and AdamW state of the 361M
ControlNet, the 860M UNet, and the base's memory-mapped files; README, "Real SD 1.5").

Each stage's wall time and peak RSS (and peak GPU memory on a GPU) are written to
``reports/test-artifacts/sd_scale.json`` (and printed with -s).

On a GPU the same flow runs at SD's own size with the memory options (issue 32; ``bench/gpu_check.sh``):
``CNKIT_SD_SCALE_RESOLUTION=512``, ``CNKIT_SD_SCALE_TRAIN_ARGS="--mixed_precision=bf16 --gradient_checkpointing=true"``,
and ``CNKIT_SD_SCALE_BASE=<folder>`` to load a base saved by ``cnkit sd15`` instead of building one.
Peak RSS is per stage: VmHWM is reset at each stage's start (``/proc/self/clear_refs``), so a stage's number includes
what earlier stages still hold (the base cached by ``cnkit.generation.generate``, for example).
"""

import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "reports" / "test-artifacts"
RESOLUTION = int(os.environ.get("CNKIT_SD_SCALE_RESOLUTION", "128"))
EXTRA_TRAIN_ARGS = os.environ.get("CNKIT_SD_SCALE_TRAIN_ARGS", "").split()
SAVED_BASE = os.environ.get("CNKIT_SD_SCALE_BASE", "")
MIXED_PRECISION = next((a.split("=", 1)[1] for a in EXTRA_TRAIN_ARGS if a.startswith("--mixed_precision=")), "no")
MEASURED: dict[str, dict] = {}


def _vm(field: str) -> float | None:
    """GiB of a /proc/self/status field (VmRSS, VmHWM); None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


class stage:
    """Wall time and peak RSS of a block, recorded in MEASURED[name]."""

    def __init__(self, name: str, **extra):
        self.name, self.extra = name, extra

    def __enter__(self):
        gc.collect()
        try:  # "5" resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.rss_before = _vm("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall, peak = time.perf_counter() - self.t0, _vm("VmHWM")
        gc.collect()
        MEASURED[self.name] = {"wall_s": round(wall, 1), "ok": exc[0] is None,
                               "rss_before_gib": _round(self.rss_before), "peak_rss_gib": _round(peak),
                               "rss_after_gib": _round(_vm("VmRSS")),
                               "rss_after_file_backed_gib": _round(_vm("RssFile")),
                               "live_tensors_after_gib": _live_tensors_gib(), **self.extra}
        if torch.cuda.is_available():
            MEASURED[self.name]["peak_gpu_gib"] = _round(torch.cuda.max_memory_allocated() / 2**30)
        _write_measurements()
        return False


def _live_tensors_gib() -> float:
    """GiB of tensor storage still reachable (what RSS beyond it holds is the allocator's or the page cache's)."""
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                storage = o.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # meta tensors, odd subclasses: not memory
            continue
    return round(total / 2**30, 2)


def _round(x):
    return None if x is None else round(x, 2)


def _write_measurements():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    import cnkit.training.train

    info = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "resolution": RESOLUTION,
            "train_args": EXTRA_TRAIN_ARGS, "kit": cnkit.training.train.__file__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__}
    (ARTIFACTS / "sd_scale.json").write_text(json.dumps({"machine": info, "stages": MEASURED}, indent=1))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    _write_measurements()
    for name, m in MEASURED.items():
        print(f"\n{name:24s} {m}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(a) The SD-1.5-shaped base, built and saved once; the caller's RNG is untouched."""
    from cnkit.models.sd15 import folder_size, save_sd15_shaped

    if SAVED_BASE:
        return Path(SAVED_BASE)
    folder = tmp_path_factory.mktemp("sd15") / "base"
    with stage("build_and_save") as s:
        rng = torch.random.get_rng_state()
        save_sd15_shaped(folder, seed=0)
        assert torch.equal(torch.random.get_rng_state(), rng), "building the base changed the caller's RNG"
        s.extra["bytes_on_disk"] = folder_size(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(b) 40 Fill50K-format pairs at 128 px (36 to train on, the last 4 held out for validation)."""
    from cnkit.data.toyworld import export_fill50k

    with stage("export_dataset"):
        return export_fill50k(tmp_path_factory.mktemp("fill50k") / "data", n=40, size=RESOLUTION)


def _train_args(base, dataset, out_dir, steps):
    return [f"--base={base}", f"--dataset={dataset}", f"--steps={steps}", "--batch_size=1",
            f"--resolution={RESOLUTION}", "--validate_every=0", "--checkpoint_every=1", "--validation_size=4",
            f"--out_dir={out_dir}", *EXTRA_TRAIN_ARGS]


@pytest.fixture(scope="module")
def run_dir(base, dataset, tmp_path_factory):
    """(c) Two optimizer steps through ``python -m cnkit.training.train``'s entry point (telemetry and validation
    callbacks attached), checkpointing every step."""
    from cnkit.training import train

    out = tmp_path_factory.mktemp("run") / "controlnet"
    with stage("train_2_steps") as s:
        s.extra["result"] = train.main(_train_args(base, dataset, out, steps=2))
    gc.collect()
    return out


@pytest.fixture(scope="module")
def resumed(base, dataset, run_dir):
    """(d) The same run asked for 3 steps: it resumes from the step-2 checkpoint."""
    from cnkit.training import train

    with stage("resume_to_3_steps") as s:
        s.extra["result"] = train.main(_train_args(base, dataset, run_dir, steps=3))
    gc.collect()
    return s.extra["result"]


def test_sd15_configs_have_sd15s_parameter_counts():
    """Fast: the configs alone, built on the meta device (no memory), count SD 1.5's parameters exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cnkit.models.sd15 import SD15_PARAMETERS, SD15_TEXT, SD15_UNET, SD15_VAE

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()} == SD15_PARAMETERS
    assert parts["unet"].config.attention_head_dim == 8 and parts["unet"].config.layers_per_block == 2
    assert 2 ** (len(parts["vae"].config.block_out_channels) - 1) == 8


@pytest.mark.slow
def test_base_has_sd15_shapes_and_the_stock_pipeline_loads_it(base):
    from diffusers import StableDiffusionPipeline

    from cnkit.models.sd15 import SD15_PARAMETERS, SD15_TEXT, SD15_UNET, parameter_counts

    with stage("load_stock_pipeline") as s:
        pipe = StableDiffusionPipeline.from_pretrained(base)  # safetensors are memory-mapped: this is lazy
        s.extra["parameters"] = parameter_counts(pipe)
        t0 = time.perf_counter()
        with torch.no_grad():  # read every weight once: the time to make the base resident
            assert all(torch.isfinite(p).all() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                       for p in m.parameters())
        s.extra["read_every_weight_s"] = round(time.perf_counter() - t0, 1)
    assert s.extra["parameters"] == SD15_PARAMETERS
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == 0.18215
    assert pipe.unet.config.block_out_channels == list(SD15_UNET["block_out_channels"])
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.unet.config.sample_size == 64
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    ids = tok(["red circle with blue background", ""], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    assert ids.max() < SD15_TEXT["vocab_size"] and pipe.text_encoder.config.vocab_size == 49408
    te = pipe.text_encoder.config
    assert te.eos_token_id == tok.eos_token_id and te.bos_token_id == tok.bos_token_id
    assert te.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        assert pipe.text_encoder(ids)[0].shape == (2, 77, 768)
    del pipe


@pytest.mark.slow
def test_trains_two_steps(run_dir):
    state = json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and MEASURED["train_2_steps"]["result"]["steps"] == 2
    assert all(np.isfinite(loss) for _, loss in state["loss_history"])
    rows = (run_dir / "telemetry.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 14  # steps 0, 1 and 2; 13 connections and the condition encoder's conv_out


@pytest.mark.slow
def test_resumes_at_step_two(resumed, run_dir):
    assert resumed["resumed"] is True and resumed["steps"] == 3
    state = json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and [s for s, _ in state["loss_history"]] == [1, 2, 3]
    rows = (run_dir / "telemetry.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 14  # the resumed run appends step 3 to steps 0..2


@pytest.mark.slow
def test_checkpoint_loads_with_stock_controlnet(resumed, run_dir):
    from diffusers import ControlNetModel

    with stage("load_controlnet") as s:
        net = ControlNetModel.from_pretrained(run_dir / "checkpoint")
        s.extra["parameters"] = n = sum(p.numel() for p in net.parameters())
    assert net.config.block_out_channels == [320, 640, 1280, 1280] and net.config.cross_attention_dim == 768
    assert 350e6 < n < 370e6  # SD 1.5's ControlNet: 361M
    del net


@pytest.mark.slow
def test_generates_from_two_units(resumed, run_dir, base, dataset):
    from cnkit.generation.generate import ControlUnit, generate
    from cnkit.models.bases import forget

    cond = Image.open(dataset / "source" / "39.png").convert("RGB")
    ckpt = str(run_dir / "checkpoint")
    try:
        with stage("generate_2_units_2_steps"):
            out = generate(str(base), "red circle", [ControlUnit(ckpt, cond), ControlUnit(ckpt, cond, scale=0.5)],
                           steps=2, size=RESOLUTION)
    finally:
        forget(str(base))  # the per-process base cache would hold 4.3 GB for the rest of the session
        gc.collect()
    assert len(out.images) == 1 and out.images[0].size == (RESOLUTION, RESOLUTION)
    assert out.notes == []  # the condition already has the requested size


@pytest.mark.slow
def test_validation_generates_at_the_training_resolution(base, dataset, tmp_path):
    """The validation hook at SD scale: one held-out condition, one denoising step. Its images must have the
    training resolution (128), not the base's native 512: the fidelity metric compares them with the 128-px
    condition, and 512-px validation costs 16x the compute (issue 14's report)."""
    from cnkit.training.telemetry import Validation
    from cnkit.training.train import TrainConfig, Trainer

    with stage("validation_1_item_1_step") as s:
        trainer = Trainer(TrainConfig(base=str(base), dataset=str(dataset), steps=1, batch_size=1,
                                      resolution=RESOLUTION, validate_every=1, validation_size=4,
                                      mixed_precision=MIXED_PRECISION, out_dir=str(tmp_path / "run")))
        Validation(n=1, steps=1, batch=1).attach(trainer)
        trainer.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        trainer.trigger("on_train_start")  # validates at step 0
        s.extra["validate_s"] = round(time.perf_counter() - t0, 1)
        del trainer
    rows = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert len(rows) == 2 and (tmp_path / "run" / "samples" / "step-000000.png").is_file()
