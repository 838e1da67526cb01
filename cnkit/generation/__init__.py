"""Layer 3, generation: images from a base and any number of control units.

``weighting`` (control modes and CFG resolution weighting), ``annotators`` (condition maps from images),
``adapter_pipeline`` (diffusers' text-to-image pipeline driven by any architecture), ``nets`` (a net's folder read once
while its files are unchanged) and ``generate`` (the one image loop every measurement, validation and the playground
use).
"""
