"""Control-LoRA (Stability AI): a ControlNet whose copy of the encoder stays frozen except low-rank adapters.

Planned design, not built: a ``make_controlnet(unet, "zero")`` net with every parameter frozen, LoRA adapters of a
configurable rank (e.g. 4 for the tiny base) on its attention projections and resnet convolution/linear layers
added through diffusers' own peft support (``ControlNetModel`` is a ``PeftAdapterMixin``:
``net.add_adapter(peft.LoraConfig(r=..., target_modules=[...]))``), and the zero convolutions and the condition
encoder trainable. Its checkpoint would be the LoRA weights (``get_peft_model_state_dict``) beside the zero
convolutions and condition encoder; the full net's weights would load into the stock ``ControlNetModel``.

Why it is not built: that path needs the ``peft`` package (diffusers' ``add_adapter`` checks for peft >= 0.17,
``diffusers.utils.constants.MIN_PEFT_VERSION``), and peft is not installed in the kit's environment nor declared in
``pyproject.toml``. Declaring ``peft>=0.17`` there is the maintainer's call; until then ``build`` says so instead of
shipping code that no test has run.
"""

from __future__ import annotations

import importlib.util

from .base import ControlAdapter

PEFT_REQUIREMENT = "peft>=0.17"


class ControlLoRA(ControlAdapter):
    name = "control-lora"
    loads_with = "diffusers.ControlNetModel (+ peft LoRA weights)"
    preserves_base_at_init = True  # as ControlNet: its zero convolutions start at zero

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, **options):
        if importlib.util.find_spec("peft") is None:
            raise ImportError(f"control-lora needs the peft package, which is not installed: add {PEFT_REQUIREMENT!r} "
                              "to pyproject.toml's dependencies (diffusers' ControlNetModel.add_adapter uses it)")
        raise NotImplementedError("control-lora is designed (see cnkit/architectures/control_lora.py) but not built: "
                                  "peft was not available when the architectures were written")
