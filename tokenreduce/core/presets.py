"""Plan presets: YAML files in the ``conf/plan`` Hydra config group, addressed by name.

The folder and its composition are in :mod:`tokenreduce.core.conf`; :func:`load_preset`
(composition + validation into a :class:`~tokenreduce.core.plan.Plan`) is defined with the
plan models.  This module gathers both under the name users import.  Loading a preset touches no
process-wide Hydra state: it works inside a Hydra application and from several threads.
"""

from __future__ import annotations

from .conf import compose, compose_with_choices, conf_dir, preset_names
from .plan import load_preset

__all__ = ["compose", "compose_with_choices", "conf_dir", "load_preset", "preset_names"]
