import csv
import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from cnkit import metrics
from cnkit.data.trainset import cached_store
from cnkit.training.telemetry import ZeroConvTelemetry
from cnkit.training.train import TrainConfig, Trainer


def _cfg(base_dir, out_dir, **kw):
    return TrainConfig(**(dict(base=str(base_dir), out_dir=str(out_dir), steps=4, batch_size=2, n_train=8,
                               checkpoint_every=2, learning_rate=1e-3, validate_every=0) | kw))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_config_coerces_papermill_values_and_rejects_nonsense():
    cfg = TrainConfig(steps=10.0, learning_rate="1e-4", batch_size="4", prompt_dropout=1)
    assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.prompt_dropout) == (10, 1e-4, 4, 1.0)
    assert type(cfg.prompt_dropout) is float and type(cfg.steps) is int
    with pytest.raises(ValueError, match="parameter steps must be int"):
        TrainConfig(steps=2.5)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="known variants: zero, gaussian, lite"):
        TrainConfig(variant="zeros")
    with pytest.raises(ValueError, match="prompt_dropout"):
        TrainConfig(prompt_dropout=1.5)


def test_missing_base_offline_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load the base model"):
        Trainer(TrainConfig(base="nobody/no-such-model", out_dir=str(tmp_path)))


def test_base_stays_locked_and_steps_are_counted(base_dir, tmp_path):
    tr = Trainer(_cfg(base_dir, tmp_path, gradient_accumulation=3))
    before = {n: p.clone() for n, p in tr.pipe.unet.named_parameters()}
    result = tr.run()
    assert result == result | {"steps": 4, "samples_seen": 4 * 2 * 3, "micro_batches": 12}
    assert all(torch.equal(p, before[n]) for n, p in tr.pipe.unet.named_parameters())
    assert not any(p.requires_grad for p in tr.pipe.unet.parameters())
    assert all(p.grad is None for p in tr.pipe.unet.parameters())
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["samples_seen"], state["micro_batches"]) == (4, 24, 12)
    net = ControlNetModel.from_pretrained(tmp_path / "checkpoint")  # the stock class loads it
    assert net.controlnet_down_blocks[0].weight.abs().sum() > 0


def test_telemetry_rows_and_the_step_zero_facts(base_dir, tmp_path):
    tr = Trainer(_cfg(base_dir, tmp_path, steps=2))
    ZeroConvTelemetry().attach(tr)
    tr.run()
    rows = _rows(tmp_path / "telemetry.csv")
    assert len(rows) == 3 * 14  # steps 0, 1, 2; 13 connections and the condition encoder
    step0 = [r for r in rows if r["step"] == "0"]
    assert all(float(r["weight_norm"]) == 0 and float(r["residual_rms"]) == 0 for r in step0)
    step1 = [r for r in rows if r["step"] == "1"]
    # the first gradient reaches only the zero convolutions: the condition encoder's last
    # convolution sits behind them and gets none
    assert all(float(r["grad_norm"]) > 0 for r in step1[:13]) and float(step1[13]["grad_norm"]) == 0
    assert [int(r["latent_size"]) for r in step1[:13]] == [16] * 3 + [8] * 3 + [4] * 3 + [2] * 4
    assert int(step1[0]["samples_seen"]) == 2


def test_resumed_run_matches_an_uninterrupted_one(base_dir, tmp_path, monkeypatch):
    straight = Trainer(_cfg(base_dir, tmp_path / "a"))
    ZeroConvTelemetry().attach(straight)
    straight.run()

    interrupted = Trainer(_cfg(base_dir, tmp_path / "b"))
    ZeroConvTelemetry().attach(interrupted)

    def die_after_step_3(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt

    interrupted.add_callback("on_step_end", die_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = Trainer(_cfg(base_dir, tmp_path / "b"))
    ZeroConvTelemetry().attach(resumed)
    assert resumed.run()["resumed"]
    # Same rows, same steps and counts; values equal to float32 round-off (the resumed process's
    # first optimizer step differs from the uninterrupted one in the 7th significant digit).
    ra, rb = _rows(tmp_path / "a" / "telemetry.csv"), _rows(tmp_path / "b" / "telemetry.csv")
    assert [(r["step"], r["samples_seen"], r["connection"]) for r in ra] == [
        (r["step"], r["samples_seen"], r["connection"]) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("weight_mean_abs", "weight_norm", "bias_norm", "grad_norm", "residual_rms"):
            assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-5, abs=1e-9), (x["step"], key)
    a = ControlNetModel.from_pretrained(tmp_path / "a" / "checkpoint").state_dict()
    b = ControlNetModel.from_pretrained(tmp_path / "b" / "checkpoint").state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base_dir, tmp_path, monkeypatch):
    tr = Trainer(_cfg(base_dir, tmp_path, steps=6))
    real_loss = tr.loss
    monkeypatch.setattr(tr, "loss", lambda batch: real_loss(batch) * (float("nan") if tr.step >= 3 else 1))
    with pytest.raises(FloatingPointError, match=r"last good checkpoint \(step 2\)"):
        tr.run()
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_other_configuration_in_the_same_folder_is_refused(base_dir, tmp_path):
    Trainer(_cfg(base_dir, tmp_path, steps=2)).run()
    with pytest.raises(ValueError, match=r"another configuration \(learning_rate"):
        Trainer(_cfg(base_dir, tmp_path, steps=4, learning_rate=5e-4)).run()


def test_convergence_detector_reports_the_raw_series():
    steps = [0, 100, 200, 300, 400, 500]
    c = metrics.convergence(steps, [0.16, 0.16, 0.70, 0.79, 0.86, 0.89], threshold=0.7)
    assert c["converged_at_step"] == 200 and c["step_10pct"] == 200 and c["step_90pct"] == 400
    assert c["abruptness"] == pytest.approx(200 / 500)
    dip = metrics.convergence(steps, [0.1, 0.8, 0.5, 0.8, 0.9, 0.9], threshold=0.7)
    assert dip["converged_at_step"] == 300  # the dip at 200 counts: it must *stay* above
    never = metrics.convergence(steps, [0.2] * 6, threshold=0.7)
    assert never["converged_at_step"] is None and never["abruptness"] is None


def test_disc_iou_finds_the_disc_without_trusting_colours():
    from cnkit.data import toyworld

    s = toyworld.sample("fill", 3)
    assert metrics.disc_iou(s.image, s.conditions["outline"]) > 0.95
    other = toyworld.sample("fill", 4)
    assert metrics.disc_iou(other.image, s.conditions["outline"]) < 0.5
    assert metrics.disc_iou(np.full((64, 64, 3), 128, np.uint8), s.conditions["outline"]) == 0.0


def test_cubic_timestep_sampling_favours_high_noise(base_dir, tmp_path):
    with pytest.raises(ValueError, match="timestep_sampling must be one of uniform, cubic"):
        TrainConfig(timestep_sampling="logit")
    means = {}
    for sampling in ("uniform", "cubic"):
        tr = Trainer(_cfg(base_dir, tmp_path / sampling, timestep_sampling=sampling, batch_size=512))
        tr.data = cached_store(tr.cfg, tr.pipe, tr.resolution, tmp_path / "cache")
        t = tr._micro_batch(tr.data, 0)["t"].float()
        assert 0 <= t.min() and t.max() <= 999
        means[sampling] = float(t.mean())
    assert abs(means["uniform"] - 500) < 40 and abs(means["cubic"] - 750) < 30  # E[1 - u^3] = 3/4
