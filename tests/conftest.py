"""Shared fixtures. Nothing in the suite reaches a hub: HF_HUB_OFFLINE is set before any import."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The embedded model's architecture with fresh weights (as diffusers' get_dummy_components)."""
    from cnkit.models.tiny import build_tiny_sd

    return build_tiny_sd(seed=0)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_pipe):
    """``tiny_pipe`` saved as a base folder, what TrainConfig(base=...) reads (tests only read it)."""
    path = tmp_path_factory.mktemp("base")
    tiny_pipe.save_pretrained(path)
    return path


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
        "controlnet_cond": torch.rand(2, 3, 64, 64, generator=g),
    }
