"""Layer 1, data: what a ControlNet is trained and measured on.

``toyworld`` (worlds drawn with exact truth), ``readers`` (Fill50K folders, imagefolders, parquet shards, hub
datasets), ``splits`` (what is held out, and which seeds each measurement uses), ``encoded`` (the encoded training
set on disk, read a batch at a time) and ``trainset`` (the training set as the trainer reads it). They import only
the foundations: the encoders a store needs are handed in by the trainer, never imported here.
"""
