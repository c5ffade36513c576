"""The Hydra config folder (``conf/``) and its composition; knows nothing of plans.

The ``conf/`` folder lives at the top of the repository and is installed as package data
(``tokenreduce/conf``), so presets are found after a plain ``pip install`` as well as in a
source checkout.  Hydra composes (defaults lists, overrides); :mod:`tokenreduce.core.plan`
validates.  Presets: ``docs/concepts.md``.

Two more sources of presets (``docs/cli.md``):

- **Plugins**: an installed package names a config folder of its own under the entry-point group
  ``tokenreduce.conf`` (``[project.entry-points."tokenreduce.conf"] my_plugin = "my_pkg.conf"``,
  a package whose folder holds ``plan/*.yaml``, ``model/*.yaml`` ...).  Its presets are used by
  name like the built-in ones; a built-in preset of the same name wins (:func:`preset_conflicts`).
  The folder is found without importing the package.
- **Files**: a group override whose value is a YAML file path (``plan=./my_plan.yaml``) composes
  that file as the group's option, named after its file stem.

Composition uses a private Hydra config loader, never Hydra's process-wide state
(``GlobalHydra``): a preset can be loaded inside a user's own Hydra application (``@hydra.main``,
``initialize_config_dir``) and from several threads at once.  Calls are serialised by a lock.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PlanError

__all__ = [
    "CONF_ENTRY_POINT_GROUP",
    "PluginConf",
    "compose",
    "compose_with_choices",
    "conf_dir",
    "did_you_mean",
    "file_option",
    "plugin_conf_dirs",
    "preset_conflicts",
    "preset_names",
    "preset_origin",
    "preset_path",
    "reset_plugin_conf",
]

#: entry-point group whose entries name a package holding a plugin's Hydra config groups
CONF_ENTRY_POINT_GROUP = "tokenreduce.conf"
#: suffixes that make a group override's value a file path (``plan=./my_plan.yaml``)
YAML_SUFFIXES = (".yaml", ".yml")
#: serialises composition: Hydra's loader and its few singletons are not made for concurrent use
_lock = threading.RLock()


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` (up to three names) for the closest of ``options`` to ``word``
    (:func:`difflib.get_close_matches`), else ``""``."""
    close = difflib.get_close_matches(str(word), sorted(set(options)), n=3, cutoff=0.6)
    if not close:
        return ""
    names = [repr(c) for c in close]
    return f"did you mean {' or '.join(names) if len(names) < 3 else ', '.join(names[:-1]) + ' or ' + names[-1]}?"


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


@dataclass(frozen=True)
class PluginConf:
    """A config folder shipped by an installed package (entry-point group ``tokenreduce.conf``)."""

    #: ``"<distribution> <version> (entry point '<name>')"``, as components' origins read
    origin: str
    #: the folder that holds the config groups (``plan/``, ``model/`` ...)
    folder: Path


def _package_folder(dotted: str) -> Path | None:
    """The folder of package ``dotted``, found without importing it (nor its parents)."""
    top, *rest = dotted.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location).joinpath(*rest)
        if folder.is_dir():
            return folder
    return None


def plugin_conf_dirs() -> list[PluginConf]:
    """The config folders installed packages declare under the ``tokenreduce.conf`` entry-point
    group, sorted by origin.  An entry whose package folder does not exist is skipped with a
    :class:`RuntimeWarning` naming it (the rest stay usable).  Read once per process;
    :func:`reset_plugin_conf` (called by ``reset_registry()``) reads them again."""
    return list(_plugin_conf_dirs())


def reset_plugin_conf() -> None:
    """Forget the plugins' config folders (read again on next use, e.g. after installing a plugin)."""
    _plugin_conf_dirs.cache_clear()


@functools.lru_cache(maxsize=1)
def _plugin_conf_dirs() -> tuple[PluginConf, ...]:
    found: list[PluginConf] = []
    for ep in importlib.metadata.entry_points(group=CONF_ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        label = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"
        origin = f"{label} (entry point {ep.name!r})"
        folder = _package_folder(ep.value.split(":", 1)[0].strip())
        if folder is None:
            warnings.warn(
                f"{CONF_ENTRY_POINT_GROUP} entry point {ep.name!r} = {ep.value!r} of {label}: no such package folder "
                "(it must name an importable package whose folder holds config groups, e.g. my_pkg.conf); its "
                "presets are unavailable",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        found.append(PluginConf(origin, folder))
    return tuple(sorted(found, key=lambda p: p.origin))


def _preset_sources(group: str) -> tuple[dict[str, tuple[Path, str]], dict[str, list[str]]]:
    """Preset name -> (its file, its origin: ``tokenreduce`` or the plugin's), built-ins first,
    then plugins by origin; and name -> the origins of a name defined more than once (the first
    one is used)."""
    sources = {p.stem: (p, "tokenreduce") for p in sorted((conf_dir() / group).glob("*.yaml"))}
    hidden: dict[str, list[str]] = {}
    for plugin in plugin_conf_dirs():
        for path in sorted((plugin.folder / group).glob("*.yaml")):
            if path.stem in sources:
                hidden.setdefault(path.stem, [sources[path.stem][1]]).append(plugin.origin)
                continue
            sources[path.stem] = (path, plugin.origin)
    return sources, hidden


def preset_names(group: str = "plan") -> list[str]:
    """Names of the presets in a config group (``plan``, ``model``, ``task``, ``suite``): the
    built-in ones and those of plugins (entry-point group ``tokenreduce.conf``)."""
    return sorted(_preset_sources(group)[0])


def preset_path(group: str, name: str) -> Path | None:
    """The YAML file of preset ``name`` in ``group`` (built-in or a plugin's), None if unknown."""
    found = _preset_sources(group)[0].get(name)
    return found[0] if found else None


def preset_origin(group: str, name: str) -> str | None:
    """Where preset ``name`` of ``group`` comes from: ``"tokenreduce"`` (built-in) or the plugin's
    ``"<distribution> <version> (entry point '<name>')"``; None if unknown."""
    found = _preset_sources(group)[0].get(name)
    return found[1] if found else None


def preset_conflicts(group: str = "plan") -> dict[str, list[str]]:
    """Preset names defined more than once (built-in and plugins): name -> the origins, the one
    that is used first."""
    return _preset_sources(group)[1]


def file_option(value: str) -> Path | None:
    """The file a group override's value names (``./my_plan.yaml``: a value ending in ``.yaml`` or
    ``.yml``, quotes stripped, ``~`` expanded), else None (a preset name)."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if not text.lower().endswith(YAML_SUFFIXES):
        return None
    return Path(text).expanduser()


_GROUP_OVERRIDE = re.compile(r"^(?P<group>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.+)$")


def _file_overrides(overrides: Sequence[str], root: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Overrides with each ``<group>=<file.yaml>`` replaced by an option copied into ``root``
    (``root/<group>/<option>.yaml``), and ``group -> (option, stem)`` for those replaced.

    Raises:
        PlanError: the file does not exist or is a folder (named with the override).
    """
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_")}
    result: list[str] = []
    replaced: dict[str, tuple[str, str]] = {}
    for override in overrides:
        match = _GROUP_OVERRIDE.match(override)
        path = file_option(match["value"]) if match and match["group"] in groups else None
        if match is None or path is None:
            result.append(override)
            continue
        group = match["group"]
        if not path.is_file():
            what = "a folder, not a YAML file" if path.is_dir() else "no such file"
            raise PlanError(f"{override}: {what} (a {group} file path must name an existing .yaml file)")
        _check_mapping_file(override, path)
        option = f"_file_{len(replaced)}"
        (root / group).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / group / f"{option}.yaml")
        replaced[group] = (option, path.stem)
        result.append(f"{group}={option}")
    return result, replaced


def _check_mapping_file(override: str, path: Path) -> None:
    """A group option given as a file must be a YAML mapping (Hydra reads the file itself)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise PlanError(f"{override}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{override}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{override}: the file holds {type(data).__name__}, not a mapping of keys (e.g. stages: [...])")


@functools.lru_cache(maxsize=8)
def _loader(folders: tuple[str, ...], first: str | None = None) -> Any:
    """A Hydra config loader for ``folders`` (the built-in config folder, then plugins' folders;
    ``first``: a folder searched before them all), private to tokenreduce (not registered in
    GlobalHydra)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_config_search_path(folders[0])
    for folder in folders[1:]:  # after the built-in folder, before the structured-config schema (Hydra wants it last)
        search_path.prepend("tokenreduce-plugin", f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    if first is not None:
        search_path.prepend("tokenreduce-file", f"file://{first}")
    return ConfigLoaderImpl(config_search_path=search_path)


def _compose(overrides: Sequence[str], config_name: str) -> tuple[Any, dict[str, str]]:
    """The composed config (without its ``hydra`` node) and the option chosen in each config group."""
    from hydra import __version__ as hydra_version
    from hydra.types import RunMode
    from hydra.version import VersionBase
    from omegaconf import OmegaConf, open_dict
    from packaging.version import Version

    folders = (str(conf_dir()), *(str(p.folder) for p in plugin_conf_dirs()))
    with _lock, tempfile.TemporaryDirectory(prefix="tokenreduce-conf-") as tmp:
        overrides, replaced = _file_overrides(overrides, Path(tmp))
        # a loader per call when files are composed (their temporary folder is new each time)
        loader = _loader(folders, tmp) if replaced else _loader(folders)
        # the Hydra version's defaults, as initialize_config_dir(version_base=None) gives, but only
        # for this call when no application chose a version base: a user's own set-up is left alone
        base = VersionBase.instance()
        before = base.getbase()
        if not isinstance(before, Version):
            current = Version(hydra_version)
            base.setbase(Version(f"{current.major}.{current.minor}"))
        try:
            cfg = loader.load_configuration(
                config_name=config_name, overrides=list(overrides), run_mode=RunMode.RUN, from_shell=False
            )
        finally:
            base.version_base = before
            if replaced:
                _loader.cache_clear()
    runtime = OmegaConf.to_container(cfg.hydra.runtime.choices)
    assert isinstance(runtime, dict)
    choices = {str(k): str(v) for k, v in runtime.items() if not str(k).startswith("hydra") and v is not None}
    for group, (option, stem) in replaced.items():
        if choices.get(group) == option:
            choices[group] = stem
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
    """:func:`compose`, plus the option chosen in each config group (``{"plan": "demo", ...}``;
    a group given as a file, ``plan=./my_plan.yaml``, reads as the file's stem, ``my_plan``).

    Raises:
        PlanError: as :func:`compose`; its ``__cause__`` is Hydra's (or OmegaConf's) exception
            (none for a file path that does not exist).
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
