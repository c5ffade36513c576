"""Plan presets: YAML files in the ``conf/plan`` Hydra config group, addressed by name.

The folder and its composition are in :mod:`tokenreduce.core.conf`; :func:`load_preset`
(composition + validation into a :class:`~tokenreduce.core.plan.Plan`) is defined with the
plan models.  This module gathers both under the name users import.
"""

from __future__ import annotations

from .conf import compose, conf_dir, preset_names
from .plan import load_preset

__all__ = ["compose", "conf_dir", "load_preset", "preset_names"]
