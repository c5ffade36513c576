"""Hydra configs (installed as ``tokenreduce.conf``): plan presets in ``plan/``, models in ``model/``."""
