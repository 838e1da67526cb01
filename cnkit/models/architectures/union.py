"""One ControlNet for several conditions at once (in the spirit of Uni-ControlNet's local adapter and ControlNet-Union).

What it is: the paper's ControlNet (``make_controlnet(unet, "zero")``) whose condition encoder takes the ``n``
condition maps stacked on the channel axis (``conditioning_channels = 3 x n``), so one net and one forward pass
serve any combination. Per-condition dropout (``condition_dropout``, in training mode only) zeroes each condition map
of each item independently, so the net also learns every subset; a missing condition at inference is a map of
zeros (``pack`` builds the stacked tensor from a list with ``None`` for the missing ones). Everything else is
ControlNet's: 13 zero convolutions, the base unchanged at step 0, a stock ``ControlNetModel`` checkpoint.

What it is not: Uni-ControlNet (Zhao et al. 2023) feeds its stacked local conditions through a multi-scale
condition encoder into the copy's features by feature denormalisation (FDN) and has a second, global adapter for
image embeddings; ControlNet-Union / ProMax (xinsir) adds a condition-type embedding and a transformer that fuses
per-condition features, and trains 10+ condition types. Neither the type embedding, the fusion transformer, FDN nor
the global adapter is here: this is the simplest multi-condition net, the baseline those designs improve on.
"""

from __future__ import annotations

import torch

from .base import check_condition
from .controlnet import ControlNet


class UnionControlNet(ControlNet):
    name = "union"
    variant = "zero"

    def __init__(self, net, vae_scale_factor: int, n_conditions: int = 2, condition_dropout: float = 0.0,
                 channels_per_condition: int = 3):
        super().__init__(net, vae_scale_factor, n_conditions=n_conditions, condition_dropout=condition_dropout,
                         channels_per_condition=channels_per_condition)
        if n_conditions < 1 or net.config.conditioning_channels != n_conditions * channels_per_condition:
            raise ValueError(f"a union net of {n_conditions} conditions x {channels_per_condition} channels needs "
                             f"conditioning_channels={n_conditions * channels_per_condition}, its net has "
                             f"{net.config.conditioning_channels}")
        if not 0 <= condition_dropout < 1:
            raise ValueError(f"condition_dropout must be within [0, 1), got {condition_dropout}")
        self.n_conditions, self.condition_dropout = n_conditions, condition_dropout
        self.channels_per_condition = channels_per_condition
        # predict_noise drops conditions itself in training mode (torch's global RNG); a trainer that replays its
        # batches exactly sets this False and calls drop_conditions(cond, its_generator) when it draws the batch.
        self.drops_in_predict = True

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, n_conditions: int = 2,
              condition_dropout: float = 0.5, channels_per_condition: int = 3):
        """``condition_dropout``: the chance that each condition map of each training item is zeroed."""
        base = ControlNet.build(unet, vae_scale_factor, seed=seed,
                                conditioning_channels=n_conditions * channels_per_condition)
        return cls(base.net, vae_scale_factor, n_conditions, condition_dropout, channels_per_condition)

    def pack(self, conditions) -> torch.Tensor:
        """The stacked condition from one map per condition ((B, 3, H, W) tensors; ``None`` for a missing one)."""
        if isinstance(conditions, torch.Tensor):
            return conditions
        if len(conditions) != self.n_conditions:
            raise ValueError(f"this union net takes {self.n_conditions} conditions (None for a missing one), "
                             f"got {len(conditions)}")
        like = next((c for c in conditions if c is not None), None)
        if like is None:
            raise ValueError("at least one condition must be given; for none, use the base alone")
        return torch.cat([c if c is not None else torch.zeros_like(like) for c in conditions], dim=1)

    def drop_conditions(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``cond`` with each condition map of each item zeroed with probability ``condition_dropout``. A trainer
        that must replay its batches passes its own ``generator`` (on the CPU)."""
        b = cond.shape[0]
        keep = torch.rand(b, self.n_conditions, generator=generator) >= self.condition_dropout
        keep = keep.repeat_interleave(self.channels_per_condition, dim=1).to(cond.device, cond.dtype)
        return cond * keep[:, :, None, None]

    def control(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        cond = self.pack(cond)
        if cond.shape[1] != self.n_conditions * self.channels_per_condition:
            raise ValueError(f"this union net reads {self.n_conditions} condition maps ({self.n_conditions} x "
                             f"{self.channels_per_condition} channels), got {cond.shape[1]} channels: give it a set "
                             f"of {self.n_conditions} maps, in its training order (None for a missing one)")
        check_condition(self.name, sample, cond, self.vae_scale_factor, cond.shape[1])
        if self.training and self.drops_in_predict and self.condition_dropout > 0:
            cond = self.drop_conditions(cond)
        return super().control(unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale)

    @torch.no_grad()
    def injections(self, unet, sample, timestep, encoder_hidden_states, cond):
        return super().injections(unet, sample, timestep, encoder_hidden_states, self.pack(cond))
