"""The foundation layer: config loading, Ray bootstrap, lineage and storage helpers.

``core`` imports nothing of the project; ``pipelines/`` and ``mm/`` build on it, and ``jobs/``
(the entrypoints) on all three (DESIGN.md: ``core <- {pipelines, mm} <- jobs``). The layering
is checked by tests/test_layers.py.
"""
