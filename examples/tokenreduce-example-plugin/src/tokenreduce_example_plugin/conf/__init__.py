"""Hydra config folder of tokenreduce-example-plugin (plan presets in ``plan/``).

``pyproject.toml`` names this package under the entry-point group ``tokenreduce.conf``, so its
presets are used by name: ``tokenreduce run plan=text_relevance_25``.
"""
