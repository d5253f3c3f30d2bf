"""Triton Python-backend models. Each repository's `model.py` is a two-line shim that imports one of these,
so the serving code is the package's own preprocessing / postprocessing, never a copy. No torch imports."""
