"""Layer 6, surfaces: what a person touches.

``report`` (``make figures``: every notebook at the full profile into a report), ``widgets`` (the playground) and
``cli`` (the ``cnkit`` command).
"""
