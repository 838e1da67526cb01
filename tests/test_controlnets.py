import pytest
import torch
from diffusers import ControlNetModel

from cnkit.models.controlnets import (
    ControlNetLiteModel,
    connection_table,
    make_controlnet,
    zero_convolutions,
)


def _controlled(unet, net, x):
    down, mid = net(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                    controlnet_cond=x["controlnet_cond"], return_dict=False)
    return unet(x["sample"], x["timestep"], x["encoder_hidden_states"],
                down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


def test_zero_variant_equals_base_bit_for_bit(tiny_pipe, unet_inputs):
    net = make_controlnet(tiny_pipe.unet, "zero", vae_scale_factor=4, seed=0)
    assert isinstance(net, ControlNetModel)
    with torch.no_grad():
        base = tiny_pipe.unet(unet_inputs["sample"], unet_inputs["timestep"],
                              unet_inputs["encoder_hidden_states"]).sample
        controlled = _controlled(tiny_pipe.unet, net, unet_inputs)
    assert torch.equal(base, controlled)


def test_zero_variant_first_gradient_reaches_only_zero_convolutions(tiny_pipe, unet_inputs):
    unet = tiny_pipe.unet
    unet.requires_grad_(False)
    net = make_controlnet(unet, "zero", vae_scale_factor=4, seed=0)
    loss = _controlled(unet, net, unet_inputs).pow(2).mean()
    loss.backward()
    zero_params = {f"{name}.{p}" for name, _ in zero_convolutions(net) for p in ("weight", "bias")}
    assert len(zero_params) == 26  # 13 connections, weight and bias
    nonzero = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero == zero_params
    assert all(p.grad is None for p in unet.parameters())


def test_gaussian_variant_differs_from_base_at_step_zero(tiny_pipe, unet_inputs):
    net = make_controlnet(tiny_pipe.unet, "gaussian", vae_scale_factor=4, seed=0)
    for _, conv in zero_convolutions(net, include_condition_encoder=True):
        assert conv.weight.abs().sum() > 0
    with torch.no_grad():
        base = tiny_pipe.unet(unet_inputs["sample"], unet_inputs["timestep"],
                              unet_inputs["encoder_hidden_states"]).sample
        controlled = _controlled(tiny_pipe.unet, net, unet_inputs)
    assert (base - controlled).abs().max() > 1e-3


def test_lite_variant_is_small_with_the_same_residual_shapes(tiny_pipe, unet_inputs, tmp_path):
    full = make_controlnet(tiny_pipe.unet, "zero", vae_scale_factor=4, seed=0)
    lite = make_controlnet(tiny_pipe.unet, "lite", vae_scale_factor=4, seed=0)
    n_full = sum(p.numel() for p in full.parameters())
    n_lite = sum(p.numel() for p in lite.parameters())
    assert n_lite < n_full / 3
    x = unet_inputs
    with torch.no_grad():
        a = full(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                 controlnet_cond=x["controlnet_cond"], return_dict=False)
        b = lite(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                 controlnet_cond=x["controlnet_cond"], return_dict=False)
        assert [t.shape for t in a[0]] == [t.shape for t in b[0]] and a[1].shape == b[1].shape
        # zero convolutions kept: the lite model also starts as the base
        base = tiny_pipe.unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
        assert torch.equal(base, _controlled(tiny_pipe.unet, lite, x))
    lite.save_pretrained(tmp_path)
    again = ControlNetLiteModel.from_pretrained(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(lite.parameters(), again.parameters()))


def test_unknown_variant_names_the_known_ones(tiny_pipe):
    with pytest.raises(ValueError, match="zero, gaussian, lite"):
        make_controlnet(tiny_pipe.unet, "zeros")


def test_connection_table_has_sd15s_thirteen_connections(tiny_pipe):
    net = make_controlnet(tiny_pipe.unet, "zero", vae_scale_factor=4, seed=0)
    rows = connection_table(net, tiny_pipe.unet, vae_scale_factor=4)
    assert len(rows) == 13 and rows[-1]["kind"] == "middle"
    assert [r["latent_size"] for r in rows] == [16] * 3 + [8] * 3 + [4] * 3 + [2] * 4
    assert [r["sd_latent_size"] for r in rows] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4


def test_controlnet_checkpoint_is_a_stock_diffusers_folder(tiny_pipe, tmp_path):
    net = make_controlnet(tiny_pipe.unet, "gaussian", vae_scale_factor=4, seed=0)
    net.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    again = ControlNetModel.from_pretrained(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))


def test_init_writes_a_zero_net_matched_to_the_base_and_a_wrong_factor_is_named(tiny_pipe, tmp_path, capsys):
    """python -m cnkit.models.controlnets init: the net diffusers' stock train_controlnet.py can start from on the kit's
    base (its own from_unet builds SD's factor 8, which fails at the first step on the tiny base's factor 4)."""
    from cnkit.models.controlnets import condition_factor, main

    tiny_pipe.save_pretrained(tmp_path / "base")
    main(["init", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "net"), "--seed", "3"])
    assert "downsamples by 4" in capsys.readouterr().out
    net = ControlNetModel.from_pretrained(tmp_path / "net")  # the stock class loads it
    assert condition_factor(net) == 4 and all(p.abs().sum() == 0 for p in net.controlnet_down_blocks.parameters())
    down, mid = net(torch.zeros(1, 4, 16, 16), 1, encoder_hidden_states=torch.zeros(1, 77, 64),
                    controlnet_cond=torch.zeros(1, 3, 64, 64), return_dict=False)  # fits the 64-px base
    assert mid.shape[-1] == 2
    assert condition_factor(make_controlnet(tiny_pipe, "zero")) == 4  # from a pipeline: the base's factor
    with pytest.raises(ValueError, match="vae_scale_factor=8 does not match the base's VAE, which downsamples by 4"):
        make_controlnet(tiny_pipe, "zero", vae_scale_factor=8)
