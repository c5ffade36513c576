"""The Hydra config folder (``conf/``) and its composition; knows nothing of plans.

The ``conf/`` folder lives at the top of the repository and is installed as package data
(``tokenreduce/conf``), so presets are found after a plain ``pip install`` as well as in a
source checkout.  Hydra composes (defaults lists, overrides); :mod:`tokenreduce.core.plan`
validates.  Presets: ``docs/concepts.md``.

Composition uses a private Hydra config loader, never Hydra's process-wide state
(``GlobalHydra``): a preset can be loaded inside a user's own Hydra application (``@hydra.main``,
``initialize_config_dir``) and from several threads at once.  Calls are serialised by a lock.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PlanError

__all__ = ["compose", "compose_with_choices", "conf_dir", "preset_names"]

#: serialises composition: Hydra's loader and its few singletons are not made for concurrent use
_lock = threading.RLock()


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


@functools.lru_cache(maxsize=4)
def _loader(folder: str) -> Any:
    """A Hydra config loader for ``folder``, private to tokenreduce (not registered in GlobalHydra)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    return ConfigLoaderImpl(config_search_path=create_config_search_path(folder))


def _compose(overrides: Sequence[str], config_name: str) -> tuple[Any, dict[str, str]]:
    """The composed config (without its ``hydra`` node) and the option chosen in each config group."""
    from hydra import __version__ as hydra_version
    from hydra.types import RunMode
    from hydra.version import VersionBase
    from omegaconf import OmegaConf, open_dict
    from packaging.version import Version

    with _lock:
        # the Hydra version's defaults, as initialize_config_dir(version_base=None) gives, but only
        # for this call when no application chose a version base: a user's own set-up is left alone
        base = VersionBase.instance()
        before = base.getbase()
        if not isinstance(before, Version):
            current = Version(hydra_version)
            base.setbase(Version(f"{current.major}.{current.minor}"))
        try:
            cfg = _loader(str(conf_dir())).load_configuration(
                config_name=config_name, overrides=list(overrides), run_mode=RunMode.RUN, from_shell=False
            )
        finally:
            base.version_base = before
    runtime = OmegaConf.to_container(cfg.hydra.runtime.choices)
    assert isinstance(runtime, dict)
    choices = {str(k): str(v) for k, v in runtime.items() if not str(k).startswith("hydra") and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> dict[str, Any]:
    """Compose the Hydra config with command-line style overrides; returns plain containers.

    Touches no process-wide Hydra state, so it works inside a Hydra application and from threads.

    Raises:
        PlanError: an override or a config file is invalid (Hydra's message, with the overrides).
    """
    return compose_with_choices(overrides, config_name)[0]


def compose_with_choices(
    overrides: Sequence[str] = (), config_name: str = "config"
) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`compose`, plus the option chosen in each config group (``{"plan": "demo", ...}``).

    Raises:
        PlanError: as :func:`compose`; its ``__cause__`` is Hydra's (or OmegaConf's) exception.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg, choices = _compose(overrides, config_name)
        data = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra's exception stays the cause: a caller may word it its own way (the CLI does)
        raise PlanError(f"could not compose config with overrides {list(overrides)}: {exc}") from exc
    return data, choices  # type: ignore[return-value]
