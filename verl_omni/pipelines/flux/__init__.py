"""FLUX.1-dev: ``pipeline.py`` (``FluxRLPipeline``, the diffusers ``FluxPipeline`` with the RL hooks),
``attention.py`` (the processor that serves an engine's fused attention kernel), ``standin.py`` (the tiny random
pipeline for CPU tests) and ``family.py`` (the family's registration).

Cheap to import: nothing here loads diffusers until a module below is imported.
"""
