"""Probes of a hostile but fair user, kept as tests: kills at every instant of a checkpoint save, a second process on
one run folder, a full disk, non-finite numbers, images of the wrong size or with transparency, text that does not
fit, files that are not what they say. Nothing is lost, nothing is silently wrong, every error says what to do."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnkit.data import readers as datasets
from cnkit.data import toyworld
from cnkit.experiments import configs as experiments
from cnkit.generation import generate as G
from cnkit.models.controlnets import load_controlnet, make_controlnet
from cnkit.training import checkpoints
from cnkit.training.checkpoints import Checkpoint, FolderBusy, claim
from cnkit.training.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent


def _cfg(base_dir, out_dir, **kw):
    return TrainConfig(**(dict(base=str(base_dir), out_dir=str(out_dir), steps=4, batch_size=2, n_train=8,
                               checkpoint_every=2, learning_rate=1e-3, validate_every=0) | kw))


def _state(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


# --- checkpoints: complete at every instant ------------------------------------------------------


def _saved(path: Path, step: int, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(f"weights of step {step}")
    if complete:  # the state file is written last
        (path / "state.json").write_text(json.dumps({"step": step}))
    return path


@pytest.mark.parametrize("leftovers, expected", [
    ({"checkpoint.old": (2, True), "checkpoint.tmp": (4, True)}, 4),  # killed between the two renames
    ({"checkpoint": (4, True), "checkpoint.old": (2, True)}, 4),  # killed before the old one was removed
    ({"checkpoint": (2, True), "checkpoint.tmp": (4, False)}, 2),  # killed while writing the new one
    ({"checkpoint.tmp": (4, False)}, None),  # killed while writing the first one
])
def test_a_kill_at_any_instant_of_a_save_leaves_the_newest_complete_checkpoint(tmp_path, leftovers, expected):
    for name, (step, complete) in leftovers.items():
        _saved(tmp_path / name, step, complete)
    ckpt = Checkpoint(tmp_path / "checkpoint")
    assert (ckpt.state() or {}).get("step") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == (["checkpoint"] if expected else [])
    ckpt.save(lambda folder: (folder / "weights.bin").write_text("weights of step 6"), {"step": 6})
    assert ckpt.state()["step"] == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_run_killed_between_the_renames_resumes_from_its_newest_checkpoint(base_dir, tmp_path):
    Trainer(_cfg(base_dir, tmp_path, steps=2)).run()
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # what a kill between the renames leaves
    (tmp_path / "checkpoint.old").rename(tmp_path / "checkpoint.tmp")
    result = Trainer(_cfg(base_dir, tmp_path, steps=4)).run()
    assert result["resumed"] and _state(tmp_path / "checkpoint") == 4
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path):
    ckpt = Checkpoint(tmp_path / "checkpoint")
    ckpt.save(lambda folder: (folder / "w").write_text("2"), {"step": 2})

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on the disk .* last complete checkpoint is kept"):
        ckpt.save(full, {"step": 4})
    assert ckpt.state()["step"] == 2

    def torch_full(folder):  # torch.save on a full disk raises this, not an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1984")

    with pytest.raises(OSError, match="no space left on the disk"):
        ckpt.save(torch_full, {"step": 4})
    assert ckpt.state()["step"] == 2


# --- one owner per run folder; the configuration fixed at first use ----------------------------------


def test_a_second_process_on_the_same_run_folder_is_refused(base_dir, tmp_path):
    lock = claim(tmp_path, {"a": 1}, "train_config.json", "a run")
    try:
        with pytest.raises(FolderBusy, match="another process is writing into"):
            claim(tmp_path, {"a": 1}, "train_config.json", "a run")
        done = subprocess.run([sys.executable, "-m", "cnkit", "train", f"--base={base_dir}", f"--out_dir={tmp_path}",
                               "--steps=1", "--batch_size=2", "--n_train=4", "--validate_every=0"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
        assert done.returncode != 0 and "another process is writing into" in done.stderr
    finally:
        lock.release()
    claim(tmp_path, {"a": 1}, "train_config.json", "a run").release()  # a released (or dead) owner frees it


def test_a_run_killed_before_its_first_checkpoint_is_not_overwritten_by_another_configuration(base_dir, tmp_path):
    tr = Trainer(_cfg(base_dir, tmp_path, steps=3, checkpoint_every=10))
    tr.add_callback("on_step_end", lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.step == 2 else None)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    rows = (tmp_path / "telemetry.csv").read_text() if (tmp_path / "telemetry.csv").exists() else ""
    with pytest.raises(ValueError, match=r"another configuration \(learning_rate: 0.001 -> 0.0005\)"):
        Trainer(_cfg(base_dir, tmp_path, learning_rate=5e-4)).run()
    assert ((tmp_path / "telemetry.csv").read_text() if rows else "") == rows


def test_a_run_interrupted_before_a_setting_existed_resumes_after_the_upgrade(base_dir, tmp_path):
    """A folder written before a TrainConfig field was added does not record it: it ran with the field's
    LATER_SETTINGS value, so resuming is not "another configuration"; a different value still is."""
    import json

    from cnkit.training.train import LATER_SETTINGS

    tr = Trainer(_cfg(base_dir, tmp_path, steps=3, checkpoint_every=10))
    tr.add_callback("on_step_end", lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.step == 2 else None)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    config = json.loads((tmp_path / "train_config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("lora_rank", "condition_dropout")}
    assert {"lora_rank", "condition_dropout"} <= set(LATER_SETTINGS)
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    assert Trainer(_cfg(base_dir, tmp_path, steps=3, checkpoint_every=10, validate_every=0)).run()["steps"] == 3
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"another configuration \(lora_rank: 8 -> 4\)"):
        Trainer(_cfg(base_dir, tmp_path, steps=3, lora_rank=4)).run()


@pytest.mark.parametrize("legacy", [False, True], ids=["clock kept", "checkpoint from before the clock was kept"])
def test_a_resumed_run_counts_the_time_of_its_earlier_sittings(base_dir, tmp_path, legacy):
    """A resumed run's clocks (validation's elapsed_s, the training loop's seconds) run on from the sitting before;
    where the checkpoint cannot say how long that was, they say "unknown" rather than restart at zero."""
    from cnkit.experiments.runs import read_table
    from cnkit.training.train import attach_watchers

    cfg = _cfg(base_dir, tmp_path, validate_every=2, validation_size=2)
    tr = Trainer(cfg)
    attach_watchers(tr)
    tr.add_callback("on_step_end", lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.step == 3 else None)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    state_file = tr.checkpoint_dir / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["step"] == 2 and state["elapsed_s"] > state["train_loop_s"] > 0
    if legacy:
        state_file.write_text(json.dumps({k: v for k, v in state.items() if k not in ("elapsed_s", "train_loop_s")}))
    again = Trainer(cfg)
    attach_watchers(again)
    result = again.run()
    assert result["resumed"] and result["steps"] == 4
    elapsed = read_table(tmp_path / "validation.csv")["elapsed_s"]
    assert len(elapsed) == 3  # steps 0 and 2 in the first sitting, 4 in the second
    if legacy:
        assert result["train_loop_s_all_sittings"] is None and np.isnan(elapsed[-1])
    else:
        assert result["train_loop_s_all_sittings"] == pytest.approx(state["train_loop_s"] + result["wall_time_s"])
        assert elapsed[2] > elapsed[1] > elapsed[0] and elapsed[2] > state["elapsed_s"]


def test_an_out_dir_that_is_a_file_is_named(base_dir, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="out_dir .* is a file"):
        Trainer(_cfg(base_dir, f)).run()


# --- numbers and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["scale", "start", "end"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_unit_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"parameter {field} must be a finite number"):
        G.ControlUnit("data/controlnets/fill-outline", np.zeros((64, 64, 3), np.uint8), **{field: value})
    with pytest.raises(ValueError, match="connection_weights must be a finite number"):
        G.ControlUnit("x", np.zeros((64, 64, 3), np.uint8), connection_weights=[1.0] * 12 + [value])


def test_non_finite_generation_settings_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        G.generate(tiny_pipe, "red circle", [], steps=1, guidance=float("nan"))


def test_a_controlnet_for_another_base_and_an_impossible_resolution_are_named(tiny_pipe, base_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                                 layers_per_block=1, norm_num_groups=8)
    net = make_controlnet(other, "zero", vae_scale_factor=8)
    with pytest.raises(ValueError, match=r"does not fit the base: its blocks are \[32, 64\] x 1 layers.*text width "
                                         r"is 128.*downsamples by 8, the base's VAE by 4"):
        G.generate(tiny_pipe, "", [G.ControlUnit(net, np.zeros((64, 64, 3), np.uint8))], steps=1)
    wrong_factor = make_controlnet(tiny_pipe.unet, "zero")  # a bare UNet: SD's factor 8 unless told
    with pytest.raises(ValueError, match="condition 64x64 px does not fit latents of 16x16.*downsamples by 8"):
        wrong_factor(torch.zeros(1, 4, 16, 16), 1, encoder_hidden_states=torch.zeros(1, 77, 64),
                     controlnet_cond=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="resolution 30 .* multiple of 32"):
        Trainer(_cfg(base_dir, tmp_path, resolution=30))
    with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA GPU"):
        Trainer(_cfg(base_dir, tmp_path, mixed_precision="fp16"))


def test_controlnet_folders_that_are_not_loadable_say_why(tmp_path, tiny_pipe):
    with pytest.raises(FileNotFoundError, match="no ControlNet at .*nothing-here"):
        load_controlnet(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="could not load the ControlNet"):
        load_controlnet(tmp_path / "empty")
    net = make_controlnet(tiny_pipe, "zero")
    net.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    weights = tmp_path / "pickled" / "diffusion_pytorch_model.bin"
    torch.save({"payload": Image.new("RGB", (1, 1))}, weights)  # an object: weights_only refuses it
    with pytest.raises(ValueError, match="only pickle weights that torch refuses to unpickle safely"):
        load_controlnet(tmp_path / "pickled")
    net.save_pretrained(tmp_path / "mismatch")
    cfg = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(cfg | {"block_out_channels": [32, 64, 64, 32]}))
    with pytest.raises(ValueError, match="weights .* do not fit its config.json"):
        load_controlnet(tmp_path / "mismatch")


# --- pixels and text that change on the way in are reported, the same in training and generation -------------


def _folder(tmp_path, size=(64, 48), alpha=False, n=6):
    rows = []
    for i in range(n):
        s = toyworld.sample("fill", i, size=64)
        image, cond = Image.fromarray(s.image).resize(size), Image.fromarray(s.conditions["outline"]).resize(size)
        if alpha:  # a transparent background around the outline
            a = (np.asarray(cond)[..., 0] > 0).astype(np.uint8) * 255
            cond = Image.fromarray(np.dstack([np.asarray(cond), a]), "RGBA")
        (tmp_path / "source").mkdir(parents=True, exist_ok=True)
        (tmp_path / "target").mkdir(parents=True, exist_ok=True)
        cond.save(tmp_path / "source" / f"{i}.png")
        image.save(tmp_path / "target" / f"{i}.png")
        rows.append({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": s.prompt})
    (tmp_path / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_pairs_of_another_size_are_fitted_by_the_chosen_mode_and_reported(base_dir, tmp_path):
    data = _folder(tmp_path / "data")
    with pytest.warns(UserWarning, match=r"4 of 4 training pairs are 64x48, not 64x64: fitted by crop_and_resize"):
        Trainer(_cfg(base_dir, tmp_path / "run", dataset=str(data), validation_size=2, steps=1)).run()
    notes = json.loads((tmp_path / "run" / "notes.json").read_text())
    assert any("fitted by crop_and_resize" in n for n in notes)
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        TrainConfig(resize_mode="stretch")


def test_a_transparent_condition_is_the_same_condition_in_training_and_generation(tmp_path):
    data = _folder(tmp_path, size=(64, 64), alpha=True, n=1)
    with pytest.warns(UserWarning, match="transparent pixels .* composited over black"):
        trained = np.asarray(datasets.load(str(data))[0].condition)
    rgba = np.asarray(Image.open(data / "source" / "0.png"))
    assert rgba.shape[2] == 4
    unit = G.ControlUnit("x", rgba)
    seen, notes = G.unit_condition(unit)
    assert np.array_equal(seen, trained) and any("composited over black" in n for n in notes)


def test_prompts_longer_than_the_text_encoder_reads_are_reported(base_dir, tmp_path):
    data = _folder(tmp_path / "data", size=(64, 64))
    rows = [json.loads(r) for r in (data / "prompt.json").read_text().splitlines()]
    rows[0]["prompt"] = " ".join(["red circle"] * 1000)
    (data / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="1 of 4 training prompts are longer than the 77 tokens"):
        Trainer(_cfg(base_dir, tmp_path / "run", dataset=str(data), validation_size=2, steps=1)).run()


# --- files that are not what they say -----------------------------------------------------------------


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    data = _folder(tmp_path, size=(64, 64), n=2)
    (data / "prompt.json").write_bytes((data / "prompt.json").read_bytes().replace(b"circle", b"circ\xe9le", 1))
    with pytest.raises(datasets.DatasetError, match=r"prompt.json, line 1: not UTF-8 text"):
        datasets.load(str(data))


def test_a_notebook_parameter_that_is_not_a_number_is_named_before_anything_runs():
    with pytest.raises(ValueError, match="parameter steps must be int, got 'ten'"):
        experiments.run_config(steps="ten")
    with pytest.raises(ValueError, match="parameter learning_rate must be a finite number"):
        experiments.run_config(learning_rate="nan")


def test_checkpoints_module_names_a_read_only_folder(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoints.FileLock, "acquire", refuse)
    with pytest.raises(OSError, match="cannot write to .* pass an out_dir you can write to"):
        claim(tmp_path / "run", {}, "c.json", "a run")


def test_a_long_prompt_in_generation_is_noted_and_a_file_that_is_no_controlnet_is_named(tiny_pipe, tmp_path):
    from cnkit.models.controlnets import make_controlnet as build

    net = build(tiny_pipe, "zero")
    out = G.generate(tiny_pipe, "red circle " * 60, [G.ControlUnit(net, np.zeros((64, 64, 3), np.uint8))], steps=1)
    assert any("tokens, cut to the 77 the text encoder reads" in n for n in out.notes)
    text = tmp_path / "notes.txt"
    text.write_text("not a net")
    with pytest.raises(ValueError, match="is a file, but not a safetensors file in the original ControlNet layout"):
        load_controlnet(text)


# --- second round (issue 31): tables stay exact, nothing overwrites a trained net, errors say the fix ------------


def _validated(folder: Path) -> list[int]:
    from cnkit.experiments.runs import read_table

    return [int(s) for s in read_table(folder / "validation.csv")["step"]]


def test_a_finished_run_entered_again_keeps_one_row_per_validated_step(base_dir, tmp_path):
    from cnkit.training.telemetry import InjectionTelemetry, Validation

    def run(**kw):
        tr = Trainer(_cfg(base_dir, tmp_path, **({"steps": 4, "validate_every": 2, "validation_size": 2} | kw)))
        InjectionTelemetry().attach(tr)
        Validation(steps=2).attach(tr)
        return tr.run()

    run()
    assert _validated(tmp_path) == [0, 2, 4]
    telemetry = (tmp_path / "telemetry.csv").read_text()
    assert run()["steps"] == 4 and _validated(tmp_path) == [0, 2, 4]  # the same command twice
    with open(tmp_path / "validation.csv", "a") as f:  # what kills during the final validation could leave
        f.write((tmp_path / "validation.csv").read_text().splitlines()[-1] + "\n4,8,disc_iou,0.1")
    run()
    assert _validated(tmp_path) == [0, 2, 4] and (tmp_path / "telemetry.csv").read_text() == telemetry
    with pytest.raises(ValueError, match=r"holds a run trained to step 4; steps=2 is fewer.*pass steps>=4"):
        run(steps=2)


def test_a_table_deleted_mid_run_is_said_when_the_run_resumes(base_dir, tmp_path):
    from cnkit.training.telemetry import Validation

    def run(steps):
        tr = Trainer(_cfg(base_dir, tmp_path, steps=steps, validate_every=1, validation_size=2))
        Validation(steps=2).attach(tr)
        tr.run()

    run(2)
    (tmp_path / "validation.csv").unlink()
    with pytest.warns(UserWarning, match="validation.csv is missing at step 2: its rows of the steps before are gone"):
        run(3)
    assert _validated(tmp_path) == [3]


def test_convergence_json_is_exact_whatever_happened_to_the_run(base_dir, tmp_path):
    from cnkit.experiments import runs

    cfg = _cfg(base_dir, tmp_path, steps=2, validate_every=1, validation_size=2)
    run = runs.train(cfg, tmp_path)
    assert run.convergence["validated_steps"] == [0, 1, 2]
    text = (run.folder / "convergence.json").read_text()
    (run.folder / "convergence.json").write_text(text[:len(text) // 2])  # cut off, as by hand
    again = runs.train(cfg, tmp_path)
    assert again.convergence["validated_steps"] == [0, 1, 2] and again.convergence["resumed"]
    shutil.rmtree(run.folder / "checkpoint")  # a finished run whose checkpoint went
    with pytest.raises(FileNotFoundError, match=r"runs.train\(cfg, runs_dir\) trains it again"):
        again.controlnet()
    logs = []
    trained = runs.train(cfg, tmp_path, log=logs.append)
    assert "without its checkpoint" in logs[0] and trained.controlnet() is not None
    assert trained.convergence["validated_steps"] == [0, 1, 2] and not trained.convergence["resumed"]
    off = runs.train(_cfg(base_dir, tmp_path, steps=1, validate_every=0), tmp_path)  # no validation at all
    assert off.convergence["validated_steps"] == [] and off.convergence["converged_at_step"] is None
    assert runs.train(_cfg(base_dir, tmp_path, steps=1, validate_every=0), tmp_path).folder == off.folder


@pytest.mark.parametrize("damage, said", [
    ("no_loss_history", "its state file has no 'loss_history'"),
    ("no_optimizer", "is incomplete: optimizer.pt is missing"),
    ("pickled_optimizer", "refuses to unpickle safely"),
    ("cut_weights", "is damaged"),
])
def test_a_checkpoint_that_cannot_be_resumed_says_which_file_and_the_fix(base_dir, tmp_path, damage, said):
    Trainer(_cfg(base_dir, tmp_path, steps=2)).run()
    ckpt = tmp_path / "checkpoint"
    if damage == "no_loss_history":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "loss_history"}))
    elif damage == "no_optimizer":
        (ckpt / "optimizer.pt").unlink()
    elif damage == "pickled_optimizer":
        torch.save({"state": Image.new("RGB", (1, 1))}, ckpt / "optimizer.pt")
    else:
        weights = ckpt / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match=rf"{said}.*delete .*checkpoint to train again from step 0"):
        Trainer(_cfg(base_dir, tmp_path, steps=4)).run()
    assert ckpt.is_dir()  # nothing deleted: the choice is the user's


def test_conversions_reach_notes_json_in_every_sitting(base_dir, tmp_path):
    data = _folder(tmp_path / "data", size=(64, 64), alpha=True, n=6)
    arr = np.asarray(Image.open(data / "target" / "0.png").convert("L")).astype(np.uint16) * 10  # 16-bit, dark
    Image.fromarray(arr).save(data / "target" / "0.png")
    cfg = dict(dataset=str(data), validation_size=2)
    with pytest.warns(UserWarning):
        Trainer(_cfg(base_dir, tmp_path / "run", steps=1, **cfg)).run()
    first = json.loads((tmp_path / "run" / "notes.json").read_text())
    assert any("4 of 4 training conditions had transparent pixels composited over black" in n for n in first)
    assert any("1 of 4 training images had 16-bit values scaled to 0..255" in n for n in first)
    with pytest.warns(UserWarning):
        Trainer(_cfg(base_dir, tmp_path / "run", steps=2, **cfg)).run()  # the second sitting
    assert json.loads((tmp_path / "run" / "notes.json").read_text()) == first
    fly = dict(cfg, encode="on_the_fly", checkpoint_every=1)  # counted as items are read, kept in the checkpoint
    with pytest.warns(UserWarning):
        Trainer(_cfg(base_dir, tmp_path / "fly", steps=1, **fly)).run()
    with pytest.warns(UserWarning):
        Trainer(_cfg(base_dir, tmp_path / "fly", steps=2, **fly)).run()
    notes = json.loads((tmp_path / "fly" / "notes.json").read_text())
    assert any("4 of 4 training conditions had transparent pixels" in n for n in notes), notes  # 2 steps of 2


def test_held_out_items_that_repeat_training_items_are_said(base_dir, tmp_path):
    data = _folder(tmp_path / "data", size=(64, 64), n=6)
    rows = [json.loads(r) for r in (data / "prompt.json").read_text().splitlines()]
    rows[5] = rows[1] | {"prompt": "another prompt"}  # the same files on both sides of the split
    (data / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"1 of the 2 held-out validation items .* repeat training items .*line 6 = "
                                         r"line 2"):
        Trainer(_cfg(base_dir, tmp_path / "run", steps=1, dataset=str(data), validation_size=2)).run()
    assert any("repeat training items" in n for n in json.loads((tmp_path / "run" / "notes.json").read_text()))


def test_commands_that_write_weights_never_overwrite_a_trained_net(base_dir, tmp_path, capsys):
    from cnkit.models import controlnets, export

    net = tmp_path / "net"
    assert controlnets.main(["init", "--base", str(base_dir), "--out", str(net)]) == 0
    weights = (net / "diffusion_pytorch_model.safetensors").read_bytes()
    (net / "diffusion_pytorch_model.safetensors").write_bytes(weights)  # as if trained since
    with pytest.raises(SystemExit):
        controlnets.main(["init", "--base", str(base_dir), "--out", str(net), "--seed", "1"])
    err = capsys.readouterr().err
    assert "already holds weights" in err and "Pass --overwrite to replace them" in err
    assert (net / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert controlnets.main(["init", "--base", str(base_dir), "--out", str(net), "--seed", "1", "--overwrite"]) == 0
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        controlnets.main(["init", "--base", str(base_dir), "--out", str(tmp_path / "notes.txt")])
    assert "is a file; this command writes a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        controlnets.main(["init", "--base", str(base_dir), "--out", str(base_dir), "--overwrite"])
    assert "which this command reads" in capsys.readouterr().err
    Trainer(_cfg(base_dir, tmp_path / "run", steps=2)).run()
    with pytest.raises(SystemExit):
        controlnets.main(["init", "--base", str(base_dir), "--out", str(tmp_path / "run" / "checkpoint"),
                          "--overwrite"])
    assert "training run's checkpoint" in capsys.readouterr().err
    assert Trainer(_cfg(base_dir, tmp_path / "run", steps=2)).run()["steps"] == 2
    inside = str(net / "diffusion_pytorch_model.safetensors")
    for argv in (["--controlnet", str(net), "--out", inside, "--overwrite"],
                 ["--controlnet", str(net), "--out", str(net / "x.safetensors")]):
        with pytest.raises(SystemExit):
            export.main(argv)
        assert "which this command reads" in capsys.readouterr().err
    assert load_controlnet(net) is not None
    out = tmp_path / "net.safetensors"
    assert export.main(["--controlnet", str(net), "--out", str(out)]) == 0
    with pytest.raises(SystemExit):
        export.main(["--controlnet", str(net), "--out", str(out)])
    assert "already holds weights" in capsys.readouterr().err
    assert export.main(["--controlnet", str(net), "--out", str(out), "--overwrite"]) == 0


def test_damaged_weights_and_configs_say_the_file_and_the_fix(base_dir, tmp_path, tiny_pipe):
    from cnkit.models.bases import load_base

    net = make_controlnet(tiny_pipe, "zero")
    net.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="a weights file of the ControlNet .* is damaged.*Restore it"):
        load_controlnet(tmp_path / "cut")
    net.save_pretrained(tmp_path / "config")
    config = tmp_path / "config" / "config.json"
    config.write_text(config.read_text()[:100])
    with pytest.raises(ValueError, match="a config.json of the ControlNet .* is not valid JSON"):
        load_controlnet(tmp_path / "config")
    shutil.copytree(base_dir, tmp_path / "base")
    (tmp_path / "base" / "text_encoder" / "model.safetensors").unlink()
    torch.save({"payload": Image.new("RGB", (1, 1))}, tmp_path / "base" / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="the base .* holds pickle weights .* refuses to unpickle safely"):
        load_base(str(tmp_path / "base"))
