"""cnkit.models.export: the original ControlNet single-file layout, checked against diffusers' own reader."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from cnkit.models import export
from cnkit.models.controlnets import make_controlnet

SD15_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _small_unet(**overrides) -> UNet2DConditionModel:
    """SD 1.5's block types with small channels (as diffusers' fast tests)."""
    kwargs = dict(sample_size=8, down_block_types=SD15_DOWN, up_block_types=SD15_UP,
                  block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=8,
                  cross_attention_dim=32, attention_head_dim=4)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**kwargs)


def _random_controlnet(unet, factor: int, seed: int = 0) -> ControlNetModel:
    """A zero ControlNet with every weight redrawn, so no tensor (zero convolutions included) is all zero."""
    net = make_controlnet(unet, "zero", vae_scale_factor=factor, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def _exported(unet, factor: int, folder) -> SimpleNamespace:
    net = _random_controlnet(unet, factor)
    net.save_pretrained(folder / "net")
    file = export.export_original(net, folder / "net.safetensors")
    return SimpleNamespace(unet=unet, net=net, folder=folder / "net", file=file)


def _assert_identical(expected: ControlNetModel, got: ControlNetModel):
    a, b = expected.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def sd8(tmp_path_factory):
    """SD 1.5's layout at small width, factor-8 condition encoder (conv_out at input_hint_block.14)."""
    return _exported(_small_unet(), 8, tmp_path_factory.mktemp("sd8"))


@pytest.fixture(scope="module")
def tiny4(tiny_pipe, tmp_path_factory):
    """The kit's tiny base: factor-4 condition encoder (conv_out at input_hint_block.10)."""
    return _exported(tiny_pipe.unet, 4, tmp_path_factory.mktemp("tiny4"))


# The independent check: diffusers' own reader of the original layout.

def test_diffusers_from_single_file_reads_the_export_bit_identically(sd8):
    got = ControlNetModel.from_single_file(str(sd8.file), config=str(sd8.folder), local_files_only=True)
    _assert_identical(sd8.net, got)


def test_diffusers_reads_another_shape_too(tmp_path):
    # 3 blocks of 1 layer, attention only in the last two, 2 transformer layers each: the mapping follows the config.
    unet = _small_unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       block_out_channels=(16, 32, 32), layers_per_block=1, transformer_layers_per_block=2,
                       cross_attention_dim=16, attention_head_dim=2)
    case = _exported(unet, 8, tmp_path)
    keys = export.to_original_state_dict(case.net).keys()
    assert {k.split(".")[2] for k in keys if ".zero_convs." in k} == {str(i) for i in range(6)}  # 1 + 3x1 + 2
    assert "control_model.input_blocks.2.0.op.weight" in keys  # block 0's downsampler
    assert "control_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in keys
    got = ControlNetModel.from_single_file(str(case.file), config=str(case.folder), local_files_only=True)
    _assert_identical(case.net, got)


# Round trips through the kit's own reader.

@pytest.mark.parametrize("case", ["tiny4", "sd8"])
@pytest.mark.parametrize("config", ["stored", "folder", "dict", "unet", "unet_config"])
def test_load_original_round_trips_bit_identically(request, case, config):
    c = request.getfixturevalue(case)
    given = {"stored": None, "folder": c.folder, "dict": dict(c.net.config), "unet": c.unet,
             "unet_config": c.unet.config}[config]
    _assert_identical(c.net, export.load_original(c.file, config=given))


def test_from_original_state_dict_takes_the_dict(tiny4):
    sd = export.to_original_state_dict(tiny4.net)
    _assert_identical(tiny4.net, export.from_original_state_dict(sd, tiny4.folder))


# The key names, against REFERENCE.md's table of the original layout.

def test_original_key_names_for_sd_layout(sd8):
    sd = export.to_original_state_dict(sd8.net)
    net = sd8.net
    pairs = {
        "control_model.time_embed.0.weight": net.time_embedding.linear_1.weight,
        "control_model.time_embed.2.bias": net.time_embedding.linear_2.bias,
        "control_model.input_blocks.0.0.weight": net.conv_in.weight,
        "control_model.input_blocks.1.0.in_layers.0.weight": net.down_blocks[0].resnets[0].norm1.weight,
        "control_model.input_blocks.1.1.proj_in.weight": net.down_blocks[0].attentions[0].proj_in.weight,
        "control_model.input_blocks.3.0.op.weight": net.down_blocks[0].downsamplers[0].conv.weight,
        "control_model.input_blocks.4.0.skip_connection.weight": net.down_blocks[1].resnets[0].conv_shortcut.weight,
        "control_model.input_blocks.11.0.out_layers.3.weight": net.down_blocks[3].resnets[1].conv2.weight,
        "control_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight":
            net.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight,
        "control_model.middle_block.2.emb_layers.1.weight": net.mid_block.resnets[1].time_emb_proj.weight,
        "control_model.zero_convs.0.0.weight": net.controlnet_down_blocks[0].weight,
        "control_model.zero_convs.11.0.bias": net.controlnet_down_blocks[11].bias,
        "control_model.middle_block_out.0.bias": net.controlnet_mid_block.bias,
        "control_model.input_hint_block.0.weight": net.controlnet_cond_embedding.conv_in.weight,
        "control_model.input_hint_block.12.weight": net.controlnet_cond_embedding.blocks[5].weight,
        "control_model.input_hint_block.14.weight": net.controlnet_cond_embedding.conv_out.weight,
    }
    for key, tensor in pairs.items():
        assert torch.equal(sd[key], tensor), key
    assert all(k.startswith("control_model.") for k in sd)
    assert len({k.split(".")[2] for k in sd if ".zero_convs." in k}) == 12
    assert len(sd) == len(net.state_dict())


def test_factor_4_encoder_ends_at_input_hint_block_10(tiny4):
    sd = export.to_original_state_dict(tiny4.net)
    hint = sorted({int(k.split(".")[2]) for k in sd if ".input_hint_block." in k})
    assert hint == [0, 2, 4, 6, 8, 10]
    assert torch.equal(sd["control_model.input_hint_block.10.weight"],
                       tiny4.net.controlnet_cond_embedding.conv_out.weight)
    with safe_open(str(tiny4.file), framework="pt") as f:
        meta = f.metadata()
    assert meta[export.META_FACTOR] == "4"
    assert export.is_original_layout(tiny4.file)


# Bad input: clear errors, nothing unpickled.

@pytest.fixture(scope="module")
def lite(tiny_pipe, tmp_path_factory):
    net = make_controlnet(tiny_pipe.unet, "lite", vae_scale_factor=4, seed=0)
    folder = tmp_path_factory.mktemp("lite") / "lite"
    net.save_pretrained(folder)
    return SimpleNamespace(net=net, folder=folder)


def test_lite_net_is_refused(lite, tmp_path):
    with pytest.raises(TypeError, match="only a diffusers ControlNetModel.*ControlNetLiteModel"):
        export.export_original(lite.net, tmp_path / "lite.safetensors")
    with pytest.raises(ValueError, match="only a diffusers ControlNetModel.*ControlNetLiteModel"):
        export.export_original(lite.folder, tmp_path / "lite.safetensors")
    assert not (tmp_path / "lite.safetensors").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".bin"])
def test_pickle_files_are_refused_unread(tmp_path, tiny4, suffix):
    path = tmp_path / f"net{suffix}"
    torch.save(export.to_original_state_dict(tiny4.net), path)
    with pytest.raises(ValueError, match="only safetensors"):
        export.load_original(path, config=tiny4.folder)
    assert not export.is_original_layout(path)


def test_file_without_control_model_keys(tmp_path, tiny4):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))
    assert not export.is_original_layout(path)
    with pytest.raises(ValueError, match="no key starts with 'control_model.'"):
        export.load_original(path)
    with pytest.raises(ValueError, match="no key starts with 'control_model.'"):
        export.load_original(path, config=tiny4.folder)


def test_file_without_config_asks_for_config(tmp_path, tiny4):
    path = tmp_path / "bare.safetensors"
    save_file(export.to_original_state_dict(tiny4.net), str(path))  # no metadata, as files from elsewhere
    assert export.is_original_layout(path)
    with pytest.raises(ValueError, match=r"pass config= \(a diffusers ControlNet folder or the base's UNet\)"):
        export.load_original(path)
    _assert_identical(tiny4.net, export.load_original(path, config=tiny4.unet))


def test_config_that_does_not_fit(tiny4, sd8):
    with pytest.raises(ValueError, match="do not fit the ControlNet config"):
        export.load_original(tiny4.file, config=sd8.folder)


def test_export_writes_only_safetensors(tiny4, tmp_path):
    with pytest.raises(ValueError, match="should end in .safetensors"):
        export.export_original(tiny4.net, tmp_path / "net.ckpt")
    with pytest.raises(ValueError, match="no config.json"):
        export.export_original(tmp_path, tmp_path / "net.safetensors")


# The command line.

def test_cli_writes_the_file_and_says_a_factor_4_net_is_not_sd15(tiny4, tmp_path, capsys):
    out = tmp_path / "sub" / "tiny.safetensors"
    assert export.main(["--controlnet", str(tiny4.folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "condition encoder factor 4" in printed
    assert "not a drop-in SD 1.5 ControlNet" in printed and "same VAE factor and UNet shape" in printed
    _assert_identical(tiny4.net, export.load_original(out))


def test_cli_factor_8_and_refusal(sd8, lite, tmp_path, capsys):
    assert export.main(["--controlnet", str(sd8.folder), "--out", str(tmp_path / "sd8.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "condition encoder factor 8" in printed and "not a drop-in" not in printed
    assert "only fits a base with that UNet shape" in printed  # small channels, not SD 1.5's
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--controlnet", str(lite.folder), "--out", str(tmp_path / "lite.safetensors")])
    assert exit_info.value.code == 2
    assert "ControlNetLiteModel" in capsys.readouterr().err


def test_loaded_net_runs_like_the_original(tiny4, unet_inputs):
    loaded = export.load_original(tiny4.file)
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        expected = tiny4.net(**unet_inputs, return_dict=False)
        got = loaded(**unet_inputs, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0]))
    assert torch.equal(expected[1], got[1])


def test_no_note_for_sd15_shape():
    sd15 = {"conditioning_embedding_out_channels": (16, 32, 96, 256), "block_out_channels": (320, 640, 1280, 1280)}
    assert export.compatibility_note(sd15) is None
    assert "factor of 4" in export.compatibility_note({**sd15, "conditioning_embedding_out_channels": (16, 32, 96)})
