"""The Hydra config folder (``conf/``) and its composition; knows nothing of plans.

The ``conf/`` folder lives at the top of the repository and is installed as package data
(``tokenreduce/conf``), so presets are found after a plain ``pip install`` as well as in a
source checkout.  Hydra composes (defaults lists, overrides); :mod:`tokenreduce.core.plan`
validates.  Presets: ``docs/concepts.md``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PlanError

__all__ = ["compose", "conf_dir", "preset_names"]


def conf_dir() -> Path:
    """The Hydra config folder: the installed package data, else the checkout's ``conf/``."""
    try:
        spec = importlib.util.find_spec("tokenreduce.conf")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "config.yaml").is_file():
                return Path(loc)
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise FileNotFoundError("tokenreduce's conf/ folder was not found; reinstall the package")


def preset_names(group: str = "plan") -> list[str]:
    """Names of the presets in a config group (``plan`` or ``model``)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> dict[str, Any]:
    """Compose the Hydra config with command-line style overrides; returns plain containers."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise PlanError(f"could not compose config with overrides {list(overrides)}: {exc}") from None
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
