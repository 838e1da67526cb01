import json

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cnkit.data.toyworld import VOCABULARY
from cnkit.models.bases import vae_scale_factor
from cnkit.models.tiny import build_tiny_sd


def test_components_have_sd15_classes_and_shapes(tiny_pipe):
    p = tiny_pipe
    assert isinstance(p.vae, AutoencoderKL) and isinstance(p.unet, UNet2DConditionModel)
    assert isinstance(p.text_encoder, CLIPTextModel) and isinstance(p.tokenizer, CLIPTokenizer)
    assert vae_scale_factor(p.vae) == 4
    assert p.unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert p.unet.config.up_block_types == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert p.unet.config.layers_per_block == 2
    assert p.tokenizer.model_max_length == 77
    with torch.no_grad():
        latents = p.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)


def test_tokenizer_gives_one_token_per_prompt_word(tiny_pipe):
    tok = tiny_pipe.tokenizer
    for word in VOCABULARY:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    # unknown words still tokenize (byte fallback), never to the unknown token
    ids = tok("zebra", add_special_tokens=False).input_ids
    assert len(ids) > 1 and tok.unk_token_id not in ids


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_sd(seed=1)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_sd(seed=1)
    for (na, pa), (_, pb) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert torch.equal(pa, pb), na


def test_saves_and_loads_with_the_stock_pipeline_offline(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")), "weights must be safetensors"
    assert list(tmp_path.rglob("*.safetensors"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    for (n, a), b in zip(tiny_pipe.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b), n
    out = loaded("red circle with blue background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
