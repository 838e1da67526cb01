"""Layer 4, training: the loops and what watches them.

``checkpoints`` (run folders that survive kills), ``train`` (the trainer of ControlNet and its successors, on
Accelerate), ``telemetry`` (injection-point probes and validation, attached from outside) and ``pretrain`` (the
embedded base's own pretraining). Validation generates through the layer below.
"""
