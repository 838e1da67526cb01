import json

import pytest
import torch
from safetensors.torch import load_file

from cnkit.data.splits import HELD_OUT_FILL_PAIRS
from cnkit.training import pretrain
from cnkit.training.pretrain import PretrainConfig


def _cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), n_fill=6, n_shapes=6, vae_steps=2, vae_batch_size=2, steps=4, batch_size=2,
                warmup_steps=1, checkpoint_every=2)
    return PretrainConfig(**(base | kw))


def _unet_weights(out_dir):
    return load_file(out_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_held_out_fill_pairs_never_reach_training():
    _, prompts = pretrain.training_set(PretrainConfig(n_fill=300, n_shapes=0))
    for fill, bg in HELD_OUT_FILL_PAIRS:
        assert f"{fill} circle with {bg} background" not in prompts
    assert len(prompts) == 300


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain.pretrain(_cfg(straight), log=lambda *_: None)

    resumed = tmp_path / "resumed"

    def die_after_step_2(step, ema):
        if step == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(_cfg(resumed), log=lambda *_: None, on_checkpoint=die_after_step_2)
    assert not (resumed / "pipeline").exists()
    messages = []
    pretrain.pretrain(_cfg(resumed), log=messages.append)
    assert "unet: resumed at step 2" in messages
    a, b = _unet_weights(straight), _unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_recipe_in_the_same_folder_is_refused(tmp_path):
    pretrain.pretrain(_cfg(tmp_path, steps=2), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"another configuration \(steps: 2 -> 3\)"):
        pretrain.pretrain(_cfg(tmp_path, steps=3), log=lambda *_: None)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        pretrain.pretrain(_cfg(tmp_path, learning_rate=1e30, steps=6), log=lambda *_: None)
    state = json.loads((tmp_path / "checkpoints" / "vae" / "state.json").read_text())
    assert state["step"] == 2
