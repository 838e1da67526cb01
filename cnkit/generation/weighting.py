"""How much each connection of a control unit counts: control modes and CFG resolution weighting.

A ControlNet adds one residual per connection (13 for SD's layout: 12 skips and the middle block).
diffusers scales all of a net's residuals by one number; the WebUI's control modes and the paper's
CFG resolution weighting (Fig. 5) need one weight per connection and, for some, no control in the
unconditional half of the classifier-free-guidance batch. ``UnitControlNet`` wraps a net to do both,
and ``unit_net`` wraps it only when needed, so a plain unit's images equal diffusers' own.

- modes: ``balanced`` (as it is), ``prompt`` (soft weights 0.825 ** (12 - i), both branches),
  ``controlnet`` (the same soft weights, conditional branch only: the original guess mode);
- ``cfg_weighting``: the conditional branch only, each connection weighted by ``"paper"``: w_i = H / h_i
  (H the largest latent size, 64 for SD 1.5), ``"0.825"``, ``"logspace"`` (diffusers' guess-mode ramp)
  or ``"flat"`` (all 1, for comparison).
"""

from __future__ import annotations

import torch

from ..models.controlnets import load_controlnet

CONTROL_MODES = ("balanced", "prompt", "controlnet")
CFG_WEIGHTINGS = ("paper", "0.825", "logspace", "flat")


# --- weights ------------------------------------------------------------------------------


def soft_weights(n: int = 13, base: float = 0.825) -> list[float]:
    """The original code's soft injection: base ** (n - 1 - i), 1 at the middle block."""
    return [base ** (n - 1 - i) for i in range(n)]


def logspace_weights(n: int = 13) -> list[float]:
    """diffusers' guess-mode weights: torch.logspace(-1, 0, n)."""
    return torch.logspace(-1, 0, n).tolist()


def resolution_weights(latent_sizes: list[int]) -> list[float]:
    """The paper's CFG resolution weighting (Fig. 5): w_i = H / h_i, H the largest latent size."""
    top = max(latent_sizes)
    return [top / h for h in latent_sizes]


def cfg_weights(form: str, latent_sizes: list[int]) -> list[float]:
    if form == "paper":
        return resolution_weights(latent_sizes)
    if form == "0.825":
        return soft_weights(len(latent_sizes))
    if form == "logspace":
        return logspace_weights(len(latent_sizes))
    if form == "flat":  # the conditional branch only, every connection at 1 (what the weightings correct)
        return [1.0] * len(latent_sizes)
    raise ValueError(f"unknown CFG weighting {form!r}; known: {', '.join(CFG_WEIGHTINGS)} or None")


def connection_latent_sizes(unet, sample_size: int | None = None) -> list[int]:
    """Latent size of each of the 13 connections (12 skips and the middle block) of ``unet``."""
    c = unet.config
    size = sample_size or c.sample_size
    sizes = [size]
    for b in range(len(c.block_out_channels)):
        sizes += [size] * c.layers_per_block
        if b < len(c.block_out_channels) - 1:
            size //= 2
            sizes.append(size)
    return sizes + [size]


# --- the per-unit wrapper -----------------------------------------------------------------


class UnitControlNet(torch.nn.Module):
    """A unit's net as diffusers' MultiControlNetModel sees it, with what diffusers lacks per net:
    per-connection weights and dropping control from the unconditional half of the CFG batch."""

    def __init__(self, net, weights: list[float] | None, conditional_only: bool):
        super().__init__()
        self.net = net
        self.weights = weights
        self.conditional_only = conditional_only
        self.cfg_active = False  # set by generate(): is the batch [unconditional, conditional]?

    @property
    def config(self):  # diffusers reads global_pool_conditions from every net's config
        return self.net.config

    @property
    def dtype(self):
        return self.net.dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                guess_mode=False, return_dict=False, **kwargs):
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                             guess_mode=guess_mode, return_dict=False, **kwargs)
        residuals = [*down, mid]
        if self.weights is not None:
            if len(self.weights) != len(residuals):
                raise ValueError(f"connection_weights has {len(self.weights)} values; this ControlNet has "
                                 f"{len(residuals)} connections")
            residuals = [r * w for r, w in zip(residuals, self.weights)]
        if self.conditional_only and self.cfg_active:
            half = sample.shape[0] // 2
            residuals = [torch.cat([torch.zeros_like(r[:half]), r[half:]]) for r in residuals]
        return residuals[:-1], residuals[-1]


def unit_net(controlnet, mode: str, connection_weights, latent_sizes: list[int], guidance: float,
              cfg_weighting: str | None):
    """A unit's net as it goes into MultiControlNetModel: as it is when only diffusers' features are
    used, else wrapped (UnitControlNet) with its connection weights and branch."""
    net = load_controlnet(controlnet)
    weights = None if connection_weights is None else list(connection_weights)
    conditional_only = mode == "controlnet" or cfg_weighting is not None
    for extra in ([soft_weights(len(latent_sizes))] if mode != "balanced" else []) + (
            [cfg_weights(cfg_weighting, latent_sizes)] if cfg_weighting else []):
        weights = [a * b for a, b in zip(weights or [1.0] * len(extra), extra)]
    if weights is None and not conditional_only:
        return net  # only what diffusers has: passed to it as it is
    wrapped = UnitControlNet(net, weights, conditional_only)
    wrapped.cfg_active = guidance > 1  # diffusers batches [unconditional, conditional] when guidance > 1
    return wrapped
