"""The training set on disk (cnkit.data.encoded, cnkit.data.trainset): shards read per batch give exactly what the
encoders
gave, an interrupted encode continues, a store for another base is not reused, a dataset too big for the disk is
refused before anything is written; encoding on the fly trains too; the memory options keep the numbers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnkit.data import encoded, toyworld
from cnkit.data.trainset import Fitter, cached_store, encode_prompts
from cnkit.training.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent


def _cfg(base_dir, out_dir, **kw):
    return TrainConfig(**(dict(base=str(base_dir), out_dir=str(out_dir), steps=2, batch_size=2, n_train=40,
                               checkpoint_every=2, validate_every=0) | kw))


def test_shards_give_back_exactly_what_the_encoders_gave(tiny_pipe, tmp_path):
    ds = toyworld.ToyWorld("fill", n=40)
    fitter = Fitter(64, "crop_and_resize", tiny_pipe.tokenizer)
    store = encoded.build_store(tmp_path / "store", tiny_pipe, ds, 64, {"dataset": "toy:fill"}, fitter,
                                encode_prompts, shard_size=16, batch=8)
    assert len(store) == 40 and len(store.shards) == 3
    idx = torch.tensor([39, 0, 17, 17, 5])  # across shards, repeated, out of order
    got = store.gather(idx)
    x = torch.stack([torch.from_numpy(np.asarray(ds[int(i)].image)) for i in idx]).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        post = tiny_pipe.vae.encode(x).latent_dist
    # the store encoded in batches of 8, this in one of 5: equal up to the round-off of another batch size
    assert torch.allclose(got["latent_mean"], post.mean, atol=1e-4) and torch.allclose(got["latent_std"], post.std,
                                                                                        atol=1e-4)
    conds = np.stack([np.asarray(ds[int(i)].condition) for i in idx]).transpose(0, 3, 1, 2)
    assert np.array_equal(got["conditions"].numpy(), conds)  # PNG is lossless
    assert torch.equal(got["text"], encode_prompts(tiny_pipe, [ds[int(i)].prompt for i in idx]))
    assert torch.equal(store.empty_embed, encode_prompts(tiny_pipe, [""]))


def test_an_interrupted_encode_continues_after_its_last_shard(tiny_pipe, tmp_path, monkeypatch):
    ds = toyworld.ToyWorld("fill", n=40)
    real = encoded.save_file
    written = []

    def save_then_die(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        written.append(Path(path).name)
        if len(written) == 3:  # empty.safetensors and two shards
            raise KeyboardInterrupt

    monkeypatch.setattr(encoded, "save_file", save_then_die)
    fit = Fitter(64, "crop_and_resize", tiny_pipe.tokenizer)
    with pytest.raises(KeyboardInterrupt):
        encoded.build_store(tmp_path, tiny_pipe, ds, 64, {}, fit, encode_prompts, shard_size=16, batch=8)
    meta = json.loads((tmp_path / "store.json").read_text())
    listed = [e and e["name"] for e in meta["shards"]]
    assert listed == ["shard-00000.safetensors", None, None] and not meta["complete"]  # the second never got listed
    monkeypatch.setattr(encoded, "save_file", real)
    first = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    store = encoded.build_store(tmp_path, tiny_pipe, ds, 64, {}, fit, encode_prompts, shard_size=16, batch=8)
    assert len(store) == 40 and json.loads((tmp_path / "store.json").read_text())["complete"]
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not encoded again


def test_a_store_for_another_base_or_version_is_not_reused(tiny_pipe, tmp_path):
    from cnkit.models.tiny import build_tiny_sd

    ds = toyworld.ToyWorld("fill", n=8)
    fit = Fitter(64, "crop_and_resize", tiny_pipe.tokenizer)
    encoded.build_store(tmp_path, tiny_pipe, ds, 64, {}, fit, encode_prompts)
    other = build_tiny_sd(seed=1)
    with pytest.warns(UserWarning, match="is not reused: the base.s encoders differ"):
        encoded.build_store(tmp_path, other, ds, 64, {}, fit, encode_prompts)
    meta = json.loads((tmp_path / "store.json").read_text())
    (tmp_path / "store.json").write_text(json.dumps(meta | {"format": 0}))
    with pytest.warns(UserWarning, match="written by format 0"):
        encoded.build_store(tmp_path, other, ds, 64, {}, fit, encode_prompts)


def test_a_dataset_bigger_than_the_free_disk_is_refused_before_encoding(tiny_pipe, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(encoded.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(encoded.DiskSpaceError, match=r"needs about .* GiB .* encode='on_the_fly'"):
        encoded.build_store(tmp_path, tiny_pipe, toyworld.ToyWorld("fill", n=64), 64, {},
                            Fitter(64, "crop_and_resize", tiny_pipe.tokenizer), encode_prompts)
    assert not list(tmp_path.glob("shard-*"))


def test_runs_share_one_store_and_on_the_fly_trains_without_one(base_dir, tmp_path):
    a = Trainer(_cfg(base_dir, tmp_path / "a"), cache_dir=tmp_path / "cache")
    a.run()
    b = Trainer(_cfg(base_dir, tmp_path / "b", seed=1), cache_dir=tmp_path / "cache")
    b.run()
    assert len(list((tmp_path / "cache").glob("encoded-*/store.json"))) == 1
    fly = Trainer(_cfg(base_dir, tmp_path / "fly", encode="on_the_fly"), cache_dir=tmp_path / "cache2")
    result = fly.run()
    assert result["steps"] == 2 and not (tmp_path / "cache2").exists()
    # same items, noise and timesteps; the encoders ran per batch instead of once: equal up to round-off
    cached = json.loads((tmp_path / "a" / "checkpoint" / "trainer_state.json").read_text())["loss_history"]
    assert np.allclose([x for _, x in fly.loss_history], [x for _, x in cached], rtol=1e-4)


def test_on_the_fly_workers_read_ahead_exactly_the_items_the_loop_draws(base_dir, tmp_path):
    losses = {}
    for workers in (0, 1):
        tr = Trainer(_cfg(base_dir, tmp_path / f"w{workers}", encode="on_the_fly", num_workers=workers, steps=3,
                          gradient_accumulation=2))
        tr.run()
        losses[workers] = tr.loss_history
    assert losses[0] == losses[1]


def test_gradient_checkpointing_keeps_loss_and_gradients(base_dir, tmp_path):
    grads = {}
    for ckpt in (False, True):
        tr = Trainer(_cfg(base_dir, tmp_path / str(ckpt), gradient_checkpointing=ckpt), cache_dir=tmp_path / "c")
        tr.data = cached_store(tr.cfg, tr.pipe, tr.resolution, tr.cache_dir)
        tr.controlnet.train()
        loss = tr.loss(tr._micro_batch(tr.data, 0))
        loss.backward()
        grads[ckpt] = (loss.item(), torch.cat([p.grad.flatten() for p in tr.controlnet.parameters()
                                               if p.grad is not None]))
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-5)
    assert torch.allclose(grads[True][1], grads[False][1], rtol=1e-3, atol=1e-7)


def _peak_rss_of(code: str) -> int:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gradient_checkpointing_lowers_peak_memory(base_dir):
    """One forward and backward at 256 px, batch 8, in a fresh process each: the activations dominate."""
    code = f"""
import torch
from cnkit.models.bases import load_base
from cnkit.models.controlnets import make_controlnet
pipe = load_base({str(base_dir)!r})
net = make_controlnet(pipe, "zero", seed=0)
if {{ckpt}}:
    net.enable_gradient_checkpointing(); pipe.unet.enable_gradient_checkpointing()
g = torch.Generator().manual_seed(0)
x, t = torch.randn(8, 4, 64, 64, generator=g), torch.full((8,), 500)
text, cond = torch.randn(8, 77, 64, generator=g), torch.rand(8, 3, 256, 256, generator=g)
down, mid = net(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
out = pipe.unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
out.square().mean().backward()
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""
    plain, checkpointed = _peak_rss_of(code.format(ckpt=False)), _peak_rss_of(code.format(ckpt=True))
    assert checkpointed < plain - 100 * 2**20, (plain / 2**20, checkpointed / 2**20)


def test_eight_bit_adam_without_bitsandbytes_names_the_package(base_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match="use_8bit_adam needs the bitsandbytes package"):
        Trainer(_cfg(base_dir, tmp_path, use_8bit_adam=True)).run()


def test_bf16_keeps_fp32_master_weights_and_an_fp32_vae(base_dir, tmp_path):
    """On a CPU: autocast in bf16, every weight fp32 (CPU autocast cannot take a half-precision GroupNorm); on a GPU
    the locked UNet and text encoder are stored in bf16 as well (bench/gpu_train.py)."""
    tr = Trainer(_cfg(base_dir, tmp_path, mixed_precision="bf16", steps=1))
    assert tr.run()["steps"] == 1 and tr.accelerator.mixed_precision == "bf16"
    want = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert tr.pipe.unet.dtype == want and tr.pipe.text_encoder.dtype == want
    assert tr.pipe.vae.dtype == torch.float32 and next(tr.controlnet.parameters()).dtype == torch.float32


# --- a store is reused only when it provably matches; its bytes are checked (issue 31) ----------------------------


def _folder_cfg(base_dir, data, **kw):
    return TrainConfig(**(dict(base=str(base_dir), dataset=str(data), out_dir="unused", validation_size=2) | kw))


def _rows(data):
    return [json.loads(r) for r in (data / "prompt.json").read_text().splitlines()]


def _write_rows(data, rows):
    (data / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_store_is_encoded_again_when_the_dataset_or_the_base_changed(tiny_pipe, base_dir, tmp_path):
    import warnings

    from PIL import Image

    from cnkit.models.tiny import build_tiny_sd

    data = toyworld.export_fill50k(tmp_path / "data", n=12, size=64)
    cfg, cache = _folder_cfg(base_dir, data), tmp_path / "cache"
    first = cached_store(cfg, tiny_pipe, 64, cache)
    assert len(first) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reopened as it is: not a word
        assert torch.equal(cached_store(cfg, tiny_pipe, 64, cache).gather([0])["latent_mean"],
                           first.gather([0])["latent_mean"])
    Image.open(data / "target" / "0.png").transpose(Image.FLIP_LEFT_RIGHT).save(data / "target" / "0.png")
    with pytest.warns(UserWarning, match="the dataset changed since it was encoded: an image or condition file"):
        replaced = cached_store(cfg, tiny_pipe, 64, cache)
    assert not torch.equal(replaced.gather([0])["latent_mean"], first.gather([0])["latent_mean"])
    rows = _rows(data)
    _write_rows(data, rows + rows[:2])  # 2 rows appended: trained on (the held-out tail moves with them)
    with pytest.warns(UserWarning, match="its index file changed"):
        assert len(cached_store(cfg, tiny_pipe, 64, cache)) == 12
    _write_rows(data, rows[:7])  # 5 rows removed: items once held out are not trained on
    with pytest.warns(UserWarning, match="its index file changed"):
        assert len(cached_store(cfg, tiny_pipe, 64, cache)) == 5
    with pytest.warns(UserWarning, match="the base's encoders differ .* retrained in place"):
        cached_store(cfg, build_tiny_sd(seed=1), 64, cache)  # same base folder, other weights
    store_json = next(cache.glob("encoded-*/store.json"))
    store_json.write_text(json.dumps(json.loads(store_json.read_text()) | {"format": 0}))
    with pytest.warns(UserWarning, match="written by format 0"):
        cached_store(cfg, tiny_pipe, 64, cache)


def _built(pipe, folder, n=40):
    ds = toyworld.ToyWorld("fill", n=n)
    return lambda: encoded.build_store(folder, pipe, ds, 64, {}, Fitter(64, "crop_and_resize", pipe.tokenizer),
                                       encode_prompts, shard_size=16, batch=8)


def test_a_shard_changed_on_disk_is_named_set_aside_and_encoded_again(tiny_pipe, tmp_path):
    build = _built(tiny_pipe, tmp_path)
    good = build().gather([20, 3])
    shard = tmp_path / "shard-00001.safetensors"
    start, tensors = encoded.read_header(shard)
    where = start + tensors["latent_mean"][2] + 64
    data = bytearray(shard.read_bytes())
    data[where:where + 16] = bytes(b ^ 0xFF for b in data[where:where + 16])  # same length, other latents
    shard.write_bytes(bytes(data))
    store = encoded.EncodedStore(tmp_path)
    assert torch.equal(store.gather([3])["latent_mean"], good["latent_mean"][1:])  # another shard: read as ever
    with pytest.raises(encoded.StoreError, match=r"shard-00001.safetensors of the encoded training set .* is corrupt"
                                                 r".*Nothing was trained on it.*Rerun"):
        store.gather([20])
    assert (tmp_path / "shard-00001.safetensors.corrupt").is_file() and not shard.exists()
    with pytest.warns(UserWarning, match="shard-00001.safetensors is missing; encoding that shard again"):
        again = build()
    assert torch.equal(again.gather([20, 3])["latent_mean"], good["latent_mean"])


@pytest.mark.parametrize("damage, said", [
    ("header", "shard-00000.safetensors is not a readable shard"),
    ("store.json", "its store.json is unreadable"),
    ("empty", "empty.safetensors is missing or changed"),
    ("unlisted", "store.json does not list shard-00002.safetensors though it says the store is complete"),
    ("truncated", "shard-00001.safetensors has .* bytes, .* were written"),
])
def test_store_files_cut_short_missing_or_unlisted_are_encoded_again_with_a_warning(tiny_pipe, tmp_path, damage,
                                                                                   said):
    build = _built(tiny_pipe, tmp_path)
    good = build().gather([0, 20, 39])
    meta = json.loads((tmp_path / "store.json").read_text())
    if damage == "header":
        f = tmp_path / "shard-00000.safetensors"
        f.write_bytes(f.read_bytes()[:8] + b"\xff" * 32 + f.read_bytes()[40:])
    elif damage == "store.json":
        text = (tmp_path / "store.json").read_text()
        (tmp_path / "store.json").write_text(text[:len(text) // 2])
    elif damage == "empty":
        (tmp_path / "empty.safetensors").unlink()
    elif damage == "unlisted":
        (tmp_path / "store.json").write_text(json.dumps(meta | {"shards": meta["shards"][:2]}))
    else:
        f = tmp_path / "shard-00001.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=said):
        store = build()
    assert len(store) == 40 and torch.equal(store.gather([0, 20, 39])["latent_mean"], good["latent_mean"])


def test_a_file_where_the_store_goes_is_named_and_kept(tiny_pipe, tmp_path):
    (tmp_path / "store").write_text("mine")
    with pytest.raises(encoded.StoreError, match="is a file where the kit keeps an encoded training set: move it"):
        _built(tiny_pipe, tmp_path / "store")()
    assert (tmp_path / "store").read_text() == "mine"
