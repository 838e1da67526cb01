"""Layer 2, models: the bases and the nets that control them.

``tokenizer`` and ``tiny`` (the embedded base's parts), ``sd15`` (a random base of SD 1.5's exact shape, to test
the real path on a CPU), ``bases`` (loading any base), ``controlnets`` (the paper's nets: building, checking,
loading), ``export`` (the original single-file layout, both ways) and ``architectures`` (ControlNet and its
successors behind one interface). Models never train or generate: those are the layers above.
"""
