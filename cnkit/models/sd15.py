"""An SD-scale base you can test on a CPU: Stable Diffusion 1.5's exact architecture, random weights.

The kit claims that every path that takes the tiny model (``cnkit.models.tiny``) also takes real SD 1.5. Real SD 1.5
weights cannot be downloaded on build machines, so that claim could only be checked on a machine with a hub and
a GPU. This module builds the next best thing offline: a pipeline with SD 1.5's exact shapes (its
``vae/``, ``unet/`` and ``text_encoder/`` configs, so the same parameter counts, the same 8x downsampling, the same
768-wide text and 13 control connections at latent sizes 64/32/16/8) and weights drawn at random. Its images are
noise, but every shape, dtype, memory and speed assumption the kit makes is exercised at SD's scale:
``tests/test_sd_scale.py`` trains, resumes, loads and generates with it on a CPU at 128 px.

What differs from SD 1.5 besides the weights: the tokenizer is the kit's offline CLIP tokenizer
(``cnkit.models.tokenizer``, byte-level BPE over the toy world's words, 77 tokens), not ViT-L/14's 49,408-entry BPE; the
text encoder keeps ViT-L/14's 49,408-row embedding table (so its parameter count is SD's) and the tokenizer's ids
all fall in its first few hundred rows.

``cnkit sd15 --out DIR [--seed N] [--fp16]`` writes the folder (about 4.3 GB in fp32) and prints the
parameter counts, the time taken and the size on disk; the stock ``StableDiffusionPipeline.from_pretrained(DIR)``
loads it offline.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..data.toyworld import VOCABULARY
from ..files import check_output, write_folder
from .tiny import SD15_SCHEDULER
from .tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer

# SD 1.5's vae/config.json (diffusers' AutoencoderKL); scaling_factor 0.18215 is SD's latent scale.
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215,
)

# SD 1.5's unet/config.json.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)

# SD 1.5's text_encoder/config.json (CLIP ViT-L/14's text tower); the special-token ids are the kit tokenizer's.
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
    dropout=0.0, initializer_range=0.02, initializer_factor=1.0, projection_dim=768,
)

# What SD 1.5 has, for comparison with ``parameter_counts`` (diffusers/transformers count of the released model).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def build_sd15_shaped(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.5's architecture with fresh weights drawn after ``torch.manual_seed(seed)``; the caller's
    RNG state is left as it was. Takes about 4.3 GB of memory (fp32)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(VOCABULARY, tmp)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", EOS))}
    if max(ids.values()) >= SD15_TEXT["vocab_size"] or len(tokenizer) > SD15_TEXT["vocab_size"]:
        raise ValueError(f"the tokenizer's ids {ids} (vocabulary {len(tokenizer)}) do not fit ViT-L/14's "
                         f"{SD15_TEXT['vocab_size']} embedding rows")
    text_config = CLIPTextConfig(**SD15_TEXT, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                 pad_token_id=ids["pad"])
    with torch.random.fork_rng(devices=[]):  # building a model must not disturb the caller's seed
        torch.manual_seed(seed)
        vae = AutoencoderKL(**SD15_VAE)
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (vae, unet, text_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of the pipeline's UNet, VAE and text encoder."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder")}


def folder_size(folder) -> int:
    """Bytes of every file under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


_CARD = """# SD-1.5-shaped base with random weights (cnkit.models.sd15)

Not Stable Diffusion 1.5: its exact architecture (VAE, UNet, CLIP ViT-L/14 text tower) with weights drawn at
random after `torch.manual_seed({seed})`, and the kit's offline toy-world tokenizer. It generates noise. It exists to
test code paths at SD's scale on machines that cannot download SD (`cnkit.models.sd15`, `tests/test_sd_scale.py`).

Parameters: {counts}
"""


def save_sd15_shaped(folder, seed: int = 0, fp16: bool = False) -> Path:
    """Build (``build_sd15_shaped``) and save a diffusers pipeline folder (safetensors) that the stock
    ``StableDiffusionPipeline.from_pretrained(folder)`` loads offline. ``fp16``: weights saved in half
    precision as diffusers' ``fp16`` variant (load with ``variant="fp16"`` and a float16 ``torch_dtype``)."""
    return _save(build_sd15_shaped(seed), folder, seed, fp16)


def _save(pipe, folder, seed: int, fp16: bool) -> Path:
    folder = Path(folder)
    counts = parameter_counts(pipe)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16" if fp16 else None)
    (folder / "README.md").write_text(_CARD.format(seed=seed, counts=json.dumps(counts)))
    return folder


def main(argv=None) -> dict:
    """``cnkit sd15 --out DIR [--seed N] [--fp16]``: write the folder, print what it holds."""
    import argparse

    ap = argparse.ArgumentParser(description="Write an SD-1.5-shaped pipeline with random weights (cnkit.models.sd15)")
    ap.add_argument("--out", required=True, help="the pipeline folder to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    ap.add_argument("--fp16", action="store_true", help="save half-precision weights as the 'fp16' variant")
    ap.add_argument("--overwrite", action="store_true", help="replace the weights already in --out")
    args = ap.parse_args(argv)
    try:
        check_output(args.out, args.overwrite, folder=True)
    except FileExistsError as e:
        ap.error(str(e))
    start = time.perf_counter()
    pipe = build_sd15_shaped(args.seed)
    counts = parameter_counts(pipe)
    folder = write_folder(Path(args.out), lambda f: _save(pipe, f, args.seed, args.fp16))
    seconds = time.perf_counter() - start
    result = {"folder": str(folder), "parameters": counts, "sd15_parameters": SD15_PARAMETERS,
              "build_and_save_s": round(seconds, 1), "bytes_on_disk": folder_size(folder)}
    for name, n in counts.items():
        print(f"{name:13s} {n:>13,d} parameters (SD 1.5: {SD15_PARAMETERS[name]:,d})")
    print(f"built and saved in {seconds:.1f} s; {result['bytes_on_disk'] / 2**30:.2f} GiB on disk in {folder}")
    return result


if __name__ == "__main__":
    main()
