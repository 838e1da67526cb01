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


OLD_WORDS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple", "circle", "square",
             "triangle", "with", "background", "on", "and", ",")


@pytest.fixture(scope="module")
def first_base(tmp_path_factory):
    """A base of the first edition's kind (eight colour words), to continue."""
    from cnkit.models.tiny import build_tiny_sd

    folder = tmp_path_factory.mktemp("first-base")
    build_tiny_sd(seed=1, words=OLD_WORDS).save_pretrained(folder)
    return folder


def _warm(out_dir, base, **kw):
    return _cfg(out_dir, **({"warm_start": str(base), "n_fill": 4, "n_shapes": 4, "n_fill50k": 4, "n_fill_x11": 4,
                             "vae_steps": 2, "vae_anchor": 1.0, "colour_init": True, "text_layers": 3,
                             "schedule": "wsd", "decay_steps": 0} | kw))


def test_continuing_a_base_widens_its_vocabulary_and_resumes_exactly(tmp_path, first_base):
    straight = tmp_path / "straight"
    pipe, stats = pretrain.pretrain(_warm(straight, first_base, steps=6), log=lambda *_: None)
    assert stats["start"]["from"] == str(first_base) and stats["start"]["colour_placed_words"] > 90
    assert pipe.text_encoder.config.num_hidden_layers == 3
    ids = pipe.tokenizer("pale golden rod circle with old lace background", add_special_tokens=False).input_ids
    assert len(ids) == 8  # one token a word
    assert set(stats["cpu_s"]) == {"vae", "latents", "unet"} and all(v > 0 for v in stats["cpu_s"].values())
    # a wsd run stopped at step 4 and extended to 6 is the run that had asked for 6 from the start
    extended = tmp_path / "extended"
    pretrain.pretrain(_warm(extended, first_base, steps=4), log=lambda *_: None)
    messages = []
    _, resumed = pretrain.pretrain(_warm(extended, first_base, steps=6), log=messages.append)
    assert "unet: resumed at step 4" in messages
    # the latents were encoded in the first sitting: their cost is still counted (it travels with the cache)
    encoded = pretrain.latents_cpu_s(extended / "latents.safetensors")
    assert encoded > 0 and resumed["cpu_s"]["latents"] == encoded
    a, b = _unet_weights(straight), _unet_weights(extended)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_quality_curve_is_scored_by_the_judge_and_not_charged_to_training(tmp_path, first_base):
    calls = []

    def judge(pipe):
        calls.append(pipe.text_encoder.training)
        rate = {"one_disc": 0.5, "fill_colour": 0.5, "background_colour": 0.5}
        return {"fill": rate, "fill_x11": rate, "shapes": {"correct": 0.25, "colours_and_counts": 0.5}}

    pretrain.pretrain(_warm(tmp_path, first_base, steps=4, eval_every=2), log=lambda *_: None, judge=judge)
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["step", "samples_seen", "cpu_s"]
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "2", "4"] and calls == [False] * 3
    cpu = [float(line.split(",")[2]) for line in lines[1:]]
    assert cpu == sorted(cpu)
