"""cnkit.generation.generate: control units over diffusers' pipeline; equal to diffusers where only its features are
used."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

from cnkit.data import toyworld
from cnkit.generation import generate as G
from cnkit.generation import weighting as W
from cnkit.models.controlnets import make_controlnet

KW = dict(steps=3, guidance=4.0, seed=7)


@pytest.fixture(scope="module")
def parts(tiny_pipe):
    pipe = tiny_pipe
    pipe.set_progress_bar_config(disable=True)
    # Gaussian-initialised nets: their residuals are not zero, so every weighting shows.
    nets = [make_controlnet(pipe.unet, "gaussian", vae_scale_factor=4, seed=s).eval() for s in (1, 2)]
    conds = [toyworld.sample("shapes", i).conditions["segmentation"] for i in (1, 2)]
    return pipe, nets, conds


def _diffusers(pipe, controlnet, image, prompt="red circle", negative=""):
    p = StableDiffusionControlNetPipeline(**{**pipe.components,
                                             "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)},
                                          controlnet=controlnet)
    p.set_progress_bar_config(disable=True)
    return p(prompt, negative_prompt=negative, image=image, num_inference_steps=KW["steps"],
             guidance_scale=KW["guidance"], generator=[torch.Generator().manual_seed(KW["seed"])], height=64,
             width=64, output_type="np").images[0]


def _ours(pipe, units, **kw):
    return np.asarray(G.generate(pipe, "red circle", units, **(KW | kw)).images[0]).astype(np.float32) / 255


def test_one_unit_equals_a_plain_diffusers_call(parts):
    pipe, (net, _), (cond, _) = parts
    from PIL import Image

    expected = _diffusers(pipe, net, Image.fromarray(cond))
    ours = _ours(pipe, [G.ControlUnit(net, cond)])
    assert np.abs(ours - (expected * 255).round() / 255).max() == 0


def test_two_units_equal_diffusers_multicontrolnet(parts):
    pipe, nets, conds = parts
    from PIL import Image

    expected = _diffusers(pipe, list(nets), [Image.fromarray(c) for c in conds])
    ours = _ours(pipe, [G.ControlUnit(n, c) for n, c in zip(nets, conds)])
    assert np.abs(ours - (expected * 255).round() / 255).max() == 0


def test_unit_weights_of_one_change_nothing_and_modes_change_the_image(parts):
    pipe, (net, _), (cond, _) = parts
    plain = _ours(pipe, [G.ControlUnit(net, cond)])
    assert np.array_equal(plain, _ours(pipe, [G.ControlUnit(net, cond, connection_weights=[1.0] * 13)]))
    prompt_first = _ours(pipe, [G.ControlUnit(net, cond, mode="prompt")])
    control_first = _ours(pipe, [G.ControlUnit(net, cond, mode="controlnet")])
    assert not np.array_equal(plain, prompt_first) and not np.array_equal(prompt_first, control_first)
    # Without guidance there is no unconditional branch: "controlnet" is then the soft weights alone.
    assert np.array_equal(_ours(pipe, [G.ControlUnit(net, cond, mode="prompt")], guidance=1.0),
                          _ours(pipe, [G.ControlUnit(net, cond, mode="controlnet")], guidance=1.0))


def test_zero_connection_weights_and_zero_scale_give_the_base_image(parts):
    pipe, (net, _), (cond, _) = parts
    base = np.asarray(G.generate(pipe, "red circle", [], **KW).images[0]).astype(np.float32) / 255
    assert np.array_equal(base, _ours(pipe, [G.ControlUnit(net, cond, connection_weights=[0.0] * 13)]))
    assert np.array_equal(base, _ours(pipe, [G.ControlUnit(net, cond, scale=0)]))


def test_cfg_weighting_forms():
    sd = [64] * 4 + [32] * 3 + [16] * 3 + [8] * 3  # SD 1.5's 13 connections, finest first
    # the paper's Fig. 5: the 64-px connections count 1, the 8-px ones (and the middle block) 8
    assert W.resolution_weights(sd) == [1.0] * 4 + [2.0] * 3 + [4.0] * 3 + [8.0] * 3
    # the released code's 0.825 ** (12 - i) and diffusers' logspace(-1, 0, 13) are the same ramp within 2e-3
    assert np.allclose(W.soft_weights(13), W.logspace_weights(13), atol=2e-3)
    assert W.soft_weights(13)[-1] == 1.0 and W.soft_weights(13)[0] == pytest.approx(0.1, abs=0.002)


def test_connection_latent_sizes_follow_the_unet(tiny_pipe):
    assert W.connection_latent_sizes(tiny_pipe.unet) == [16, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2, 2]


def test_cfg_weighting_puts_control_in_the_conditional_branch_only(parts):
    pipe, (net, _), (cond, _) = parts
    plain = _ours(pipe, [G.ControlUnit(net, cond)])
    images = {form: _ours(pipe, [G.ControlUnit(net, cond)], cfg_weighting=form) for form in W.CFG_WEIGHTINGS}
    assert not np.array_equal(images["paper"], plain) and not np.array_equal(images["paper"], images["0.825"])
    assert np.abs(images["0.825"] - images["logspace"]).max() < 0.05  # the two forms agree within 2e-3
    with pytest.raises(ValueError, match="unknown cfg_weighting 'linear'"):
        G.generate(pipe, "x", [G.ControlUnit(net, cond)], cfg_weighting="linear", **KW)


def test_conditions_of_another_size_are_fitted_and_reported(parts):
    pipe, (net, _), _ = parts
    wide = toyworld.sample("fill", 3, size=96).conditions["outline"][:48]  # 96 wide, 48 high
    for mode in G.RESIZE_MODES:
        out = G.generate(pipe, "red circle", [G.ControlUnit(net, wide, resize_mode=mode)], **KW)
        assert out.conditions[0].size == (64, 64) and f"96x48 fitted to 64x64 by {mode}" in out.notes[0]
    fitted, note = G.fit_condition(np.zeros((64, 64, 3), np.uint8), 64, 64)
    assert note is None and fitted.size == (64, 64)


def test_annotated_sources_previews_and_clear_errors(parts):
    pipe, (net, _), _ = parts
    sample = toyworld.sample("shapes", 5)
    seen = []
    out = G.generate(pipe, "", [G.ControlUnit(net, sample, annotator="toy_segmentation")],
                     on_step=lambda i, n, latents: seen.append((i, n, tuple(latents.shape))), **KW)
    assert np.array_equal(np.asarray(out.conditions[0]), sample.conditions["segmentation"])
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)] and seen[0][2][1:] == (4, 16, 16)
    with pytest.raises(ValueError, match="toy-world sample is a source"):
        G.generate(pipe, "", [G.ControlUnit(net, sample)], **KW)
    with pytest.raises(ValueError, match="unknown control mode 'strong'"):
        G.ControlUnit(net, sample, mode="strong")
    with pytest.raises(ValueError, match="start .* must be below its end"):
        G.ControlUnit(net, sample, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="connection_weights has 3 values; this ControlNet has 13"):
        G.generate(pipe, "", [G.ControlUnit(net, sample, annotator="toy_segmentation",
                                            connection_weights=[1, 1, 1])], **KW)
    with pytest.raises(ValueError, match="uint8"):
        G.generate(pipe, "", [G.ControlUnit(net, np.zeros((64, 64, 3), np.float32))], **KW)
    with pytest.raises(FileNotFoundError, match="no ControlNet at nobody/nothing"):  # offline: not a hub id here
        G.generate(pipe, "", [G.ControlUnit("nobody/nothing", sample.image)], **KW)


def test_generate_many_gives_each_item_the_image_a_single_call_gives(parts):
    pipe, nets, conds = parts
    prompts, seeds = ["red circle", "blue square on green background"], [7, 8]
    many = G.generate_many(pipe, prompts, [[c] for c in conds], [nets[0]], seeds, steps=3, guidance=4.0)
    for k in range(2):
        one = np.asarray(G.generate(pipe, prompts[k], [G.ControlUnit(nets[0], conds[k])], steps=3, guidance=4.0,
                                    seed=seeds[k]).images[0])
        assert np.abs(one.astype(int) - many[k]).max() <= 1  # batch-size round-off only
    two = G.generate_many(pipe, prompts[:1], [conds], nets, seeds[:1], steps=3, guidance=4.0, cfg_weighting="paper")
    assert two.shape == (1, 64, 64, 3) and two.dtype == np.uint8
    with pytest.raises(ValueError, match="one entry per image"):
        G.generate_many(pipe, prompts, [[conds[0]]], [nets[0]], seeds)


def test_flat_weighting_is_the_conditional_branch_alone(parts):
    pipe, (net, _), (cond, _) = parts
    flat = _ours(pipe, [G.ControlUnit(net, cond)], cfg_weighting="flat")
    assert not np.array_equal(flat, _ours(pipe, [G.ControlUnit(net, cond)]))  # the unconditional half lost control
    # Without guidance there is no unconditional half: flat weighting is then the plain unit.
    assert np.array_equal(_ours(pipe, [G.ControlUnit(net, cond)], cfg_weighting="flat", guidance=1.0),
                          _ours(pipe, [G.ControlUnit(net, cond)], guidance=1.0))


def test_a_unit_takes_an_original_layout_single_file(parts, tmp_path):
    """What the WebUI and ComfyUI load (cnkit.models.export) works as a unit's ControlNet: with the config the kit
    stores
    in it, and without (a file from elsewhere), read against the base's UNet."""
    from safetensors.torch import load_file, save_file

    from cnkit.models.export import export_original

    pipe, (net, _), (cond, _) = parts
    ours = export_original(net, tmp_path / "net.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(ours), bare)  # the same tensors, no metadata
    expected = _ours(pipe, [G.ControlUnit(net, cond)])
    assert np.array_equal(expected, _ours(pipe, [G.ControlUnit(str(ours), cond)]))
    assert np.array_equal(expected, _ours(pipe, [G.ControlUnit(str(bare), cond)]))


# --- words the base never saw (issue 28) ---------------------------------------------------------


def test_a_word_the_embedded_base_never_saw_is_warned_once_per_call_and_noted(tiny_pipe):
    from cnkit.models.vocabulary import word_list_tokenizer

    assert word_list_tokenizer(tiny_pipe.tokenizer)  # built from the toy world's words, as data/tiny-sd's
    with pytest.warns(G.UnknownWordsWarning) as caught:
        out = G.generate(tiny_pipe, "red dog with zebra background", steps=1, guidance=1.0)
    assert len(caught) == 1 and "dog, zebra" in str(caught[0].message) and "not trained" in str(caught[0].message)
    assert any("dog, zebra" in n for n in out.notes)
    with pytest.warns(G.UnknownWordsWarning) as caught:  # generate_many: one warning for all its prompts
        G.generate_many(tiny_pipe, ["red dog", "blue dog", "green cat"], None, [], [0, 1, 2], steps=1,
                        guidance=1.0)
    assert len(caught) == 1 and "dog, cat" in str(caught[0].message)


def test_known_words_and_clip_like_tokenizers_give_no_warning(tiny_pipe):
    import warnings

    from cnkit.models.vocabulary import unknown_prompt_words

    with warnings.catch_warnings():
        warnings.simplefilter("error", G.UnknownWordsWarning)
        out = G.generate(tiny_pipe, "red circle with blue background", steps=1, guidance=1.0)
    assert not any("unknown" in n for n in out.notes)

    class ClipLike:  # SD's tokenizer: 49,408 tokens; it splits rare words into known pieces
        def __len__(self):
            return 49408

        def __call__(self, text, add_special_tokens=True):
            raise AssertionError("a large tokenizer is not asked about words")

    assert unknown_prompt_words(ClipLike(), ["pale golden rod circle"]) == []


# --- nets read once while unchanged (issue 27) ----------------------------------------------------


def test_a_controlnet_folder_is_read_once_until_its_files_change(tmp_path, parts):
    import os

    from cnkit.generation import nets as N

    pipe, (net, _), (cond, _) = parts
    folder = tmp_path / "net"
    net.save_pretrained(folder)
    N.forget()
    before = N.loads["count"]
    first = G.generate(pipe, "red circle", [G.ControlUnit(str(folder), cond)], **KW).images[0]
    second = G.generate(pipe, "red circle", [G.ControlUnit(folder, cond)], **KW).images[0]
    assert N.loads["count"] == before + 1  # the second call did not read the folder again
    assert np.array_equal(np.asarray(first), np.asarray(second))
    weights = folder / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: the folder may hold new weights
    G.generate(pipe, "red circle", [G.ControlUnit(str(folder), cond)], **KW)
    assert N.loads["count"] == before + 2
    N.forget()


def test_the_cache_is_bounded(tmp_path, parts):
    from cnkit.generation import nets as N

    pipe, (net, _), _ = parts
    N.forget()
    for k in range(N.MAX_NETS + 2):
        net.save_pretrained(tmp_path / f"net{k}")
        N.load_net(tmp_path / f"net{k}", pipe.unet)
    assert len(N._CACHE) == N.MAX_NETS
    N.forget()


def test_a_missing_controlnet_folder_is_named():
    from cnkit.models.controlnets import load_controlnet

    with pytest.raises(FileNotFoundError, match="no ControlNet at .*no-such-net"):
        load_controlnet("no-such-net")
    with pytest.raises(FileNotFoundError, match="data/controlnets/shapes-outline"):  # a shipped net's short name
        load_controlnet("shapes-outline")
