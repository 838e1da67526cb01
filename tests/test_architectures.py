"""cnkit.models.architectures: every architecture builds from the tiny base (factor 4) and from a small SD-layout UNet
(factor 8), predicts noise of the UNet's shape, leaves the locked base untouched by a training step, reports its
injections, round-trips its checkpoint through the class that loads it, and behaves at step 0 as its method says."""

from types import SimpleNamespace

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from cnkit.models import architectures as A
from cnkit.models.architectures.base import ControlAdapter
from cnkit.models.architectures.controlnext import ControlNeXtModel
from cnkit.models.architectures.t2i_adapter import feature_shapes
from cnkit.models.controlnets import ControlNetLiteModel

# (registry name, build options): every architecture that can be built here, T2I-Adapter in both of its types.
CASES = [("controlnet", {}), ("controlnet-gaussian", {}), ("controlnet-lite", {}), ("control-lora", {}),
         ("controlnet-xs", {}), ("t2i-adapter", {}), ("t2i-adapter", {"adapter_type": "light_adapter"}),
         ("controlnext", {}), ("union", {})]
IDS = [n + ("-light" if o else "") for n, o in CASES]
KIT_CLASSES = {"cnkit.models.controlnets.ControlNetLiteModel": ControlNetLiteModel,
               "cnkit.models.architectures.controlnext.ControlNeXtModel": ControlNeXtModel}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and two threads on a shared 2-core machine made each call
    ~50x slower (oversubscription) instead of faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The tiny base (own copy: building an architecture locks the UNet, and the shared tiny_pipe must stay as is)."""
    from cnkit.models.tiny import build_tiny_sd

    pipe = build_tiny_sd(seed=0)
    return SimpleNamespace(unet=pipe.unet, factor=4, latent=16, text=64, pipe=pipe)


@pytest.fixture(scope="module")
def sd_layout():
    """SD 1.5's block layout (three cross-attention blocks, one plain, 2 layers) at small widths, VAE factor 8."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    return SimpleNamespace(unet=unet.eval(), factor=8, latent=8, text=32)


def inputs(base, name, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = base.latent * base.factor
    cond = torch.rand(batch, 6 if name == "union" else 3, size, size, generator=g)
    return {"sample": torch.randn(batch, 4, base.latent, base.latent, generator=g),
            "timestep": torch.tensor([10, 700][:batch]),
            "encoder_hidden_states": torch.randn(batch, 8, base.text, generator=g), "cond": cond}


def build(name, options, base, seed=0):
    adapter = A.build(name, base.unet, vae_scale_factor=base.factor, seed=seed, **options)
    return adapter.eval()


@pytest.mark.parametrize("base_name", ["tiny", "sd_layout"])
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_builds_predicts_and_behaves_at_step_0_as_its_method_says(name, options, base_name, request):
    base = request.getfixturevalue(base_name)
    adapter = build(name, options, base)
    x = inputs(base, name)
    with torch.no_grad():
        eps = adapter.predict_noise(base.unet, **x)
        plain = base.unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
    assert eps.shape == x["sample"].shape
    with torch.no_grad():
        assert torch.equal(adapter(base.unet, **x), eps)  # forward is predict_noise (what DDP wrappers call)
    assert torch.isfinite(eps).all()
    if adapter.preserves_base_at_init:  # zero connections: the base's output, bit for bit
        assert torch.equal(eps, plain)
    else:  # Gaussian connections, T2I-Adapter's features, ControlNeXt's cross normalisation act from step 0
        assert (eps - plain).abs().max() > 1e-3


@pytest.mark.parametrize("base_name", ["tiny", "sd_layout"])
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_injections_match_their_points(name, options, base_name, request):
    base = request.getfixturevalue(base_name)
    adapter = build(name, options, base)
    x = inputs(base, name)
    points = adapter.injection_points()
    injections = adapter.injections(base.unet, **x)
    hooked = ControlAdapter.injections(adapter, base.unet, **x)  # the points' outputs in a real forward pass
    assert len(points) == len(injections) == len(hooked) > 0
    for (point, module), inj, seen in zip(points, injections, hooked):
        assert torch.equal(inj, seen), point
        assert inj.shape[0] == 2 and inj.shape[-1] <= base.latent, point
        if isinstance(module, torch.nn.Conv2d):
            assert inj.shape[1] == module.out_channels, point
    # what telemetry watches: the points (the paper's nets add their condition encoder's last convolution)
    watched, outputs = adapter.watched_points(), adapter.watched_outputs(base.unet, **x)
    assert watched[: len(points)] == points and len(outputs) == len(watched)
    assert all(torch.equal(a, b) for a, b in zip(outputs, injections))


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_one_training_step_moves_the_adapter_and_not_the_base(name, options, tiny):
    adapter = build(name, options, tiny).train()
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    trainable = adapter.trainable_parameters()
    assert not {id(p) for p in trainable} & {id(p) for p in tiny.unet.parameters()}
    start = [p.detach().clone() for p in trainable]
    x = inputs(tiny, name, seed=1)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss = F.mse_loss(adapter.predict_noise(tiny.unet, **x), torch.randn_like(x["sample"]))
    loss.backward()
    assert all(p.grad is None for p in tiny.unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()
    after = tiny.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, p) for a, p in zip(start, trainable))
    print(f"{name} {options or ''}: {sum(p.numel() for p in trainable):,} trainable parameters (tiny base)")


def load_with_its_class(adapter, folder, unet):
    """The saved folder read by the class named in ``loads_with``, as its users read it: diffusers' own where one
    exists (for a Control-LoRA, diffusers' Control-LoRA path: the base's copy, then the LoRA file)."""
    if adapter.name == "control-lora":
        net = diffusers.ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=adapter.options["conditioning_embedding_out_channels"])
        net.load_lora_adapter(str(folder), weight_name="control_lora.safetensors", prefix=None)
        return net
    module, cls_name = adapter.loads_with.rsplit(".", 1)
    cls = getattr(diffusers, cls_name) if module == "diffusers" else KIT_CLASSES[adapter.loads_with]
    return cls.from_pretrained(str(folder))


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_checkpoint_round_trips_through_the_class_that_loads_it(name, options, tiny, tmp_path):
    adapter = build(name, options, tiny, seed=3)
    with torch.no_grad():  # move every weight off its initial value, zero convolutions included
        for p in adapter.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = adapter.save_pretrained(tmp_path / name)
    assert list(folder.glob("*.safetensors"))
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    own = adapter.net.state_dict()
    # (diffusers names a loaded LoRA "default_0" where peft's own name is "default"; peft keeps a trained-in-full
    # module's original beside it, unused, as the net it was made from drew it)
    direct = {k.replace(".default_0.", ".default."): v
              for k, v in load_with_its_class(adapter, folder, tiny.unet).state_dict().items()}
    own = {k: v for k, v in own.items() if ".original_module." not in k}
    direct = {k: v for k, v in direct.items() if ".original_module." not in k}
    assert own.keys() == direct.keys() and [k for k in own if not torch.equal(own[k], direct[k])] == []
    loaded = A.load(folder, tiny.unet).eval()
    assert type(loaded) is type(adapter) and loaded.options == adapter.options
    assert loaded.vae_scale_factor == adapter.vae_scale_factor == 4
    back = loaded.net.state_dict()
    assert all(torch.equal(own[k], back[k]) for k in own)
    x = inputs(tiny, name)
    with torch.no_grad():
        assert torch.equal(adapter.predict_noise(tiny.unet, **x), loaded.predict_noise(tiny.unet, **x))


def test_controlnet_predict_noise_is_what_the_trainer_computes(tiny):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from cnkit.training.train import Trainer

    adapter = build("controlnet", {}, tiny)
    with torch.no_grad():  # non-zero connections, so the residuals matter
        for _, conv in adapter.injection_points():
            conv.weight.normal_(std=0.05)
    x = inputs(tiny, "controlnet")
    noise = torch.randn_like(x["sample"])
    with torch.no_grad():
        eps = adapter.predict_noise(tiny.unet, **x)
        down, mid = adapter.net(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                                controlnet_cond=x["cond"], return_dict=False)
        direct = tiny.unet(x["sample"], x["timestep"], x["encoder_hidden_states"],
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert torch.equal(eps, direct)
        assert not torch.equal(eps, tiny.unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample)
        AcceleratorState._reset_state()
        trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), adapter=adapter, pipe=tiny.pipe)
        batch = {"noisy": x["sample"], "t": x["timestep"], "text": x["encoder_hidden_states"], "cond": x["cond"],
                 "noise": noise}
        assert torch.equal(Trainer.loss(trainer, batch), F.mse_loss(eps.float(), noise))
    AcceleratorState._reset_state()


def test_t2i_adapter_features_fit_the_down_blocks(tiny, sd_layout):
    for base in (tiny, sd_layout):
        for adapter_type in ("full_adapter", "light_adapter"):
            adapter = A.build("t2i-adapter", base.unet, vae_scale_factor=base.factor, adapter_type=adapter_type)
            feats = adapter.features(inputs(base, "t2i-adapter")["cond"])
            assert [(f.shape[1], f.shape[-1]) for f in feats] == feature_shapes(base.unet, base.latent)
    assert adapter.net.total_downscale_factor == 8 * 8  # SD's layout: VAE factor x 2^(blocks - 1), as SD 1.5's 64
    narrow = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64, 96), layers_per_block=1,
                                  cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    with pytest.raises(ValueError, match="light_adapter"):
        A.build("t2i-adapter", narrow, adapter_type="light_adapter")


def test_controlnet_xs_shares_the_base_instead_of_copying_it(tiny):
    adapter = build("controlnet-xs", {}, tiny)
    fused = adapter.fused(tiny.unet)
    base_ids = {id(p) for p in tiny.unet.parameters()}
    fused_ids = {id(p) for p in fused.parameters()}
    assert fused_ids == base_ids | {id(p) for p in adapter.net.parameters()}
    assert {id(p) for p in adapter.parameters()} == {id(p) for p in adapter.net.parameters()}
    assert list(adapter.net.config.conditioning_embedding_out_channels) == [16, 32, 96]  # factor 4, the tiny VAE's


def test_controlnext_injects_once_with_the_main_branchs_statistics(tiny):
    adapter = build("controlnext", {}, tiny)
    x = inputs(tiny, "controlnext")
    main = []
    hook = tiny.unet.down_blocks[0].register_forward_hook(lambda m, a, out: main.append(out[0]))
    try:
        (injection,) = adapter.injections(tiny.unet, **x)
    finally:
        hook.remove()
    assert injection.shape == main[0].shape  # the first down block's output: 32 channels at 8x8
    for got, want in ((injection.mean((1, 2, 3)), main[0].mean((1, 2, 3))), (injection.std(dim=(1, 2, 3)),
                                                                              main[0].std(dim=(1, 2, 3)))):
        assert torch.allclose(got, want, atol=1e-5)


def test_union_serves_any_subset_of_its_conditions(tiny):
    adapter = build("union", {"condition_dropout": 0.5}, tiny)
    x = inputs(tiny, "union")
    first, second = x["cond"][:, :3], x["cond"][:, 3:]
    packed = adapter.pack([first, None])
    assert torch.equal(packed[:, :3], first) and not packed[:, 3:].any()
    dropped = adapter.drop_conditions(torch.ones(64, 6, 4, 4), torch.Generator().manual_seed(0))
    per_map = dropped.amax(dim=(2, 3))
    assert ((per_map == 0) | (per_map == 1)).all() and 0 < per_map.mean() < 1
    assert torch.equal(per_map[:, 0], per_map[:, 2]) and torch.equal(per_map[:, 3], per_map[:, 5])
    with torch.no_grad():
        assert adapter.predict_noise(tiny.unet, **{**x, "cond": [None, second]}).shape == x["sample"].shape
    assert adapter.net.config.conditioning_channels == 6
    adapter.train()
    adapter.drops_in_predict = False  # a trainer drawing the dropout with its own generator
    with torch.no_grad():
        assert torch.equal(adapter.predict_noise(tiny.unet, **x), adapter.eval().predict_noise(tiny.unet, **x))


def test_registry_names_the_known_architectures(tiny):
    assert set(A.ARCHITECTURES) == {"controlnet", "controlnet-gaussian", "controlnet-lite", "control-lora",
                                    "controlnet-xs", "t2i-adapter", "controlnext", "union"}
    with pytest.raises(ValueError, match="known architectures: controlnet, "):
        A.build("controlnet-xxl", tiny.unet)


def test_a_condition_of_the_wrong_size_is_a_clear_error(tiny):
    adapter = build("t2i-adapter", {}, tiny)
    x = inputs(tiny, "t2i-adapter")
    with pytest.raises(ValueError, match="downsamples by 4"):
        adapter.predict_noise(tiny.unet, **{**x, "cond": x["cond"][..., :32, :32]})


def test_control_lora_keeps_its_copy_at_the_base_and_stores_only_what_it_trains(tiny, tmp_path):
    lora, paper = build("control-lora", {}, tiny), build("controlnet", {}, tiny)
    trainable = sum(p.numel() for p in lora.trainable_parameters())
    assert trainable < 0.5 * sum(p.numel() for p in paper.trainable_parameters())
    # the copy's own weights are the base encoder's and stay frozen: only LoRA factors and the new parts train
    names = {n for n, p in lora.net.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in names)
    copy_conv = lora.net.down_blocks[0].resnets[0].conv1.base_layer
    assert torch.equal(copy_conv.weight, tiny.unet.down_blocks[0].resnets[0].conv1.weight)
    assert not copy_conv.weight.requires_grad
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    lora_bytes = sum(f.stat().st_size for f in lora.save_pretrained(tmp_path / "lora").glob("*.safetensors"))
    paper_bytes = sum(f.stat().st_size for f in paper.save_pretrained(tmp_path / "paper").glob("*.safetensors"))
    assert lora_bytes < 0.5 * paper_bytes
    # the copy is rebuilt from the base: without it, loading is a clear error
    with pytest.raises(ValueError, match="Load it with the base it was trained on"):
        A.load(tmp_path / "lora")
    with pytest.raises(ValueError, match="parameter rank must be at least 1"):
        build("control-lora", {"rank": 0}, tiny)
    # a higher rank trains more
    assert sum(p.numel() for p in build("control-lora", {"rank": 16}, tiny).trainable_parameters()) > trainable
