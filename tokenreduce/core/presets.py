"""Plan presets: YAML files in the ``conf/plan`` Hydra config group, addressed by name.

The ``conf/`` folder lives at the top of the repository and is installed as package data
(``tokenreduce/conf``), so presets are found after a plain ``pip install`` as well as in a
source checkout.  Hydra composes (defaults lists, overrides); pydantic validates.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from .errors import PlanError


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
    return OmegaConf.to_container(cfg, resolve=True)


def load_preset(name: str, overrides: Sequence[str] = ()):
    """The validated :class:`~tokenreduce.core.plan.Plan` of preset ``name`` (``conf/plan/<name>.yaml``)."""
    from .plan import Plan, format_validation_error
    from pydantic import ValidationError

    known = preset_names("plan")
    if name not in known:
        raise PlanError(f"unknown plan preset {name!r}; known presets: {', '.join(known)}")
    cfg = compose([f"plan={name}", *overrides])
    data = cfg["plan"]
    data.setdefault("name", name)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"preset {name!r}: " + format_validation_error(exc, prefix="plan")) from None
