"""Hydra config folder of tokenreduce-example-plugin (plan presets in ``plan/``).

Add it to tokenreduce's search path with ``hydra.searchpath=[pkg://tokenreduce_example_plugin.conf]``.
"""
