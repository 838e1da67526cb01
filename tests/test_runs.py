"""Runs kept by configuration (cnkit.experiments.runs), folder hold-out, and two CPU processes under Accelerate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel

from cnkit.data import toyworld
from cnkit.experiments import configs as experiments
from cnkit.experiments import runs
from cnkit.training.train import TrainConfig, open_dataset

ROOT = Path(__file__).resolve().parent.parent


def _cfg(base_dir, **kw):
    return TrainConfig(**(dict(base=str(base_dir), steps=2, batch_size=2, n_train=8, checkpoint_every=2,
                               learning_rate=1e-3, validate_every=1, validation_size=2) | kw))


def test_a_run_is_trained_once_and_read_back(base_dir, tmp_path):
    logs = []
    run = runs.train(_cfg(base_dir), tmp_path, log=logs.append)
    assert "training into" in logs[0]
    report = run.convergence
    for key in ("metric", "fidelity_initial", "fidelity_final", "converged_at_step", "abruptness", "wall_time_s",
                "samples_seen", "threshold"):
        assert key in report
    assert report["metric"] == "disc_iou" and report["validated_steps"] == [0, 1, 2]
    assert report["samples_seen"] == 4 and report["wall_time_s"] > report["train_loop_s"] > 0
    assert ControlNetModel.from_pretrained(run.checkpoint).config.block_out_channels == [32, 64, 64, 64]
    assert len(run.telemetry()["step"]) == 3 * 14 and run.sample_grid(2).is_file()
    again = runs.train(_cfg(base_dir), tmp_path, log=logs.append)
    assert again.folder == run.folder and "not retrained" in logs[-1]
    other = runs.train(_cfg(base_dir, seed=1), tmp_path, log=logs.append)
    assert other.folder != run.folder and "training into" in logs[-1]
    assert len(list((tmp_path / "cache").glob("encoded-*/store.json"))) == 1  # seeds share the encoded data
    runs.train(_cfg(base_dir, data_seed=1), tmp_path, log=logs.append)
    assert len(list((tmp_path / "cache").glob("encoded-*/store.json"))) == 2


def test_shapes_validation_records_edge_f1_and_miou(base_dir, tmp_path):
    run = runs.train(_cfg(base_dir, dataset="toy:shapes/segmentation", steps=1), tmp_path)
    val = run.validation()
    assert val["metric"] == ["miou", "miou"] and val["fidelity"] == val["miou"]
    assert all(0 <= v <= 1 for v in val["edge_f1"] + val["miou"])


def test_a_folder_trains_on_all_but_its_validation_items(base_dir, tmp_path):
    folder = tmp_path / "fill"
    toyworld.export_fill50k(folder, n=10, seed=0, size=64)
    cfg = _cfg(base_dir, dataset=str(folder), validation_size=3)
    train_part = open_dataset(cfg, 64)
    assert len(train_part) == 7
    with pytest.raises(IndexError):
        train_part[7]
    from cnkit.data.readers import load
    from cnkit.data.splits import held_out_items

    everything = load(str(folder))
    held = held_out_items(cfg.dataset, 3, 64, cfg.data_seed, cfg.validation_size)
    assert [h.prompt for h in held] == [everything[i].prompt for i in (7, 8, 9)]
    with pytest.raises(ValueError, match="validation_size"):
        open_dataset(_cfg(base_dir, dataset=str(folder), validation_size=10), 64)


def _two_processes(base_dir, out, steps):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "cnkit", "train", f"--base={base_dir}", f"--steps={steps}", "--batch_size=2", "--n_train=40",
           "--validate_every=0", "--checkpoint_every=2", f"--out_dir={out}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch_resume_to_the_same_net(base_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: two CPU processes joined by
    gloo, each drawing its own batches from the one encoded store, one gradient; a run stopped at step 2 and
    resumed to 4 ends where the uninterrupted run to 4 does."""
    from safetensors.torch import load_file

    result = _two_processes(base_dir, tmp_path / "straight", 4)
    assert result["samples_seen"] == 4 * 2 * 2  # steps x batch x processes
    state = json.loads((tmp_path / "straight" / "checkpoint" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 4
    assert len(list((tmp_path / "straight" / "cache").glob("encoded-*/shard-*.safetensors"))) == 1  # encoded once
    _two_processes(base_dir, tmp_path / "resumed", 2)
    assert _two_processes(base_dir, tmp_path / "resumed", 4)["resumed"]
    a, b = (load_file(tmp_path / run / "checkpoint" / "diffusion_pytorch_model.safetensors")
            for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    ControlNetModel.from_pretrained(tmp_path / "resumed" / "checkpoint")


@pytest.mark.parametrize("variant", ["gaussian", "lite"])
def test_ablation_variants_train_validate_and_load_back(base_dir, tmp_path, variant):
    run = runs.train(_cfg(base_dir, variant=variant, steps=1), tmp_path)
    assert len(run.validation()["fidelity"]) == 2
    assert type(run.controlnet().net).__name__ == ("ControlNetLiteModel" if variant == "lite" else "ControlNetModel")


def test_run_folders_are_named_by_architecture_seed_and_the_datasets_last_letters():
    name = runs.run_folder(experiments.architecture_run("union", "segmentation", 2), "r").name
    assert name.startswith("union-shapes-segmentation-depth-edges-outline-seed2-") and "--" not in name
    fill = runs.run_folder(experiments.ablation("gaussian", 1), "r").name
    assert fill.startswith("gaussian-toy-fill-seed1-")


def test_runs_know_a_base_by_its_files_not_by_its_folder_name(base_dir, tmp_path):
    import shutil

    copy = shutil.copytree(base_dir, tmp_path / "same-base-other-name")
    (copy / "README.md").write_text("a card says what a base is; it changes nothing it computes")
    assert runs.run_key(_cfg(copy)) == runs.run_key(_cfg(base_dir))  # one base under two names shares its runs
    republished = shutil.copytree(base_dir, tmp_path / "republished")
    key_before = runs.run_key(_cfg(republished))
    weights = republished / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: what `make pretrain` publishing in place does, in the small
    weights.write_bytes(bytes(data))
    assert runs.run_key(_cfg(republished)) != key_before  # stale runs of the old edition are not reused
    hub = TrainConfig(base="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert runs.run_key(hub) != runs.run_key(TrainConfig(base="some/other-model"))  # a hub id is its own identity


def test_configs_move_to_another_base_with_nothing_else_changed(base_dir):
    from dataclasses import asdict

    moved = experiments.on_base(experiments.bench_configs(), str(base_dir))
    for cfg, before in zip(moved, experiments.bench_configs(), strict=True):
        assert cfg.base == str(base_dir) and asdict(cfg) | {"base": before.base} == asdict(before)
    assert experiments.on_base(experiments.bench_configs(), "") == experiments.bench_configs()
