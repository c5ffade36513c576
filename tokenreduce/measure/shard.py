"""Sharded evaluation: ``tokenreduce eval`` split over processes and machines (docs/scaling.md).

**The unit of work** is one evaluation batch (``eval.batch_size`` consecutive questions of the
task's fixed subset) with *every* configuration: vanilla and each plan.  Shard ``i`` of ``n``
(0-based) takes the batches ``i, i + n, i + 2n, ...``, so every (configuration x question) pair
is in exactly one shard and the assignment depends only on the number of batches (questions and
batch size) and ``n``, never on timing.  Two reasons for this unit:

* the fidelity metrics of a plan (first-token agreement, exact match, first-token KL) compare
  its answer to vanilla's on the same question, so vanilla runs on the same shard as the plans;
* each shard generates exactly the batches (same questions, same left padding, same shapes) a
  single process generates, so the numbers are bit-identical to a single-process run, not just
  close.

A shard writes one file, ``<out_dir>/shards/shard-<i>-of-<n>.json`` (five digits each, so names
of different ``n`` never collide), holding the per-question records of every configuration
(:class:`tokenreduce.measure.tasks.EvalRecords`), the timings, the resolved config and a hash of
everything that decides the numbers (:func:`config_hash`).  Merging checks that the files
belong to one run (same hash and shard count, every shard present once) and computes the table
from the records with the same code a single process uses.

Which shard a process is: ``eval.shard=i/n``, else ``RANK`` / ``WORLD_SIZE`` from the environment
(set by ``torchrun`` and ``accelerate launch``) when ``WORLD_SIZE`` > 1 (:func:`resolve_shard`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenreduce.core.errors import TokenReduceError

__all__ = [
    "FORMAT",
    "SHARD_DIR",
    "TIMING_FIELDS",
    "Shard",
    "assign_batches",
    "config_hash",
    "find_shard_files",
    "load_shards",
    "local_device",
    "parse_shard",
    "read_shard_file",
    "resolve_shard",
    "shard_from_env",
    "write_shard_file",
]

#: ``format`` of a shard file (with ``version``)
FORMAT = "tokenreduce-eval-shard"
VERSION = 1
#: the folder under ``out_dir`` that holds the shard files
SHARD_DIR = "shards"
#: metric keys that are wall time: summed over the shards when merged, so they differ from a
#: single-process run; every other key of a merged table equals the single-process one exactly
TIMING_FIELDS = ("seconds", "ms_per_example", "select_seconds")
#: config keys that do not change any number of the table (where a shard writes, how it shows
#: progress, how many threads or which device it uses): left out of :func:`config_hash`
_VOLATILE = {
    "out_dir": None,
    "overrides": None,
    "command": None,
    "eval": ("shard", "merge", "progress", "threads", "cache_inputs_mib"),
    "model": ("device",),
}
_FILE = re.compile(r"^shard-(\d+)-of-(\d+)\.json$")


@dataclass(frozen=True)
class Shard:
    """This process's part of a sharded run: shard ``index`` (0-based) of ``count``.

    ``source`` says where it came from (``eval.shard=1/4`` or ``RANK=1, WORLD_SIZE=4``);
    ``local_rank`` is ``LOCAL_RANK`` from the environment when set (the GPU of this process on
    its node)."""

    index: int
    count: int
    source: str
    local_rank: int | None = None

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def file_name(self) -> str:
        return shard_file_name(self.index, self.count)

    def batches(self, n_batches: int) -> list[int]:
        """The batch indices of this shard (:func:`assign_batches`)."""
        return assign_batches(n_batches, self.count)[self.index]


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.json"


def parse_shard(value: Any) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n`` (0-based, as torchrun's ``RANK``).

    Raises:
        ValueError: anything else, with what was wrong and what is allowed.
    """
    form = "give i/n: shard i (0-based) of n shards, 0 <= i < n, e.g. 0/4 ... 3/4"
    if not isinstance(value, str):
        raise ValueError(f"{form}; one number is not a shard" if isinstance(value, (int, float)) else form)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if match is None:
        raise ValueError(form)
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ValueError(f"the number of shards must be at least 1; {form}")
    if index >= count:
        raise ValueError(f"shard {index} does not exist among {count} (shards are numbered from 0); {form}")
    return index, count


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise TokenReduceError(
            f"environment variable {name}={text!r} is not an integer (torchrun and accelerate launch set it to the "
            "process's number); unset it, or give eval.shard=i/n"
        ) from None
    if value < 0:
        raise TokenReduceError(f"environment variable {name}={text!r} is negative; unset it, or give eval.shard=i/n")
    return value


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of a process started by ``torchrun`` / ``accelerate launch``: ``RANK`` of
    ``WORLD_SIZE`` when ``WORLD_SIZE`` > 1 (``None`` otherwise: one process).

    Raises:
        TokenReduceError: ``WORLD_SIZE`` > 1 without a valid ``RANK``, or a value that is no integer.
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE")
    if world is None or world <= 1:
        return None
    rank = _env_int(environ, "RANK")
    if rank is None:
        raise TokenReduceError(
            f"WORLD_SIZE={world} is set but RANK is not: a launcher that sets one sets both (torchrun, accelerate "
            "launch); set RANK, or give eval.shard=i/n"
        )
    if rank >= world:
        raise TokenReduceError(f"RANK={rank} is not below WORLD_SIZE={world} (ranks are 0 .. WORLD_SIZE-1)")
    return Shard(rank, world, f"RANK={rank}, WORLD_SIZE={world}", _env_int(environ, "LOCAL_RANK"))


def resolve_shard(setting: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """This process's shard: ``eval.shard`` when given (it overrides the environment), else
    :func:`shard_from_env`; ``None`` for a run that is not sharded (``eval.shard=0/1`` is one
    shard of one: a run whose output goes through the shard file and the merge)."""
    environ = os.environ if environ is None else environ
    if setting is None:
        return shard_from_env(environ)
    try:
        index, count = parse_shard(setting)
    except ValueError as exc:
        raise TokenReduceError(f"eval.shard={setting!r}: {exc}") from None
    return Shard(index, count, f"eval.shard={setting}", _env_int(environ, "LOCAL_RANK"))


def local_device(requested: str, local_rank: int | None) -> str:
    """The device of one of several processes on a machine: ``cuda:LOCAL_RANK`` when
    ``requested`` is ``auto``, ``LOCAL_RANK`` is known and CUDA is available (modulo the visible
    GPUs: a process that sees one GPU, as with ``CUDA_VISIBLE_DEVICES`` per task, uses it);
    ``requested`` otherwise (``auto`` stays ``auto``: CPU without CUDA)."""
    import torch

    if requested != "auto" or local_rank is None or not torch.cuda.is_available():
        return requested
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def assign_batches(n_batches: int, count: int) -> list[list[int]]:
    """The batch indices of each of ``count`` shards: batch ``b`` goes to shard ``b % count``
    (round robin: the shards differ by at most one batch, and the short last batch is one)."""
    if count < 1:
        raise ValueError(f"assign_batches: count must be >= 1, got {count}")
    if n_batches < 0:
        raise ValueError(f"assign_batches: n_batches must be >= 0, got {n_batches}")
    return [list(range(i, n_batches, count)) for i in range(count)]


def _strip(resolved: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in resolved.items():
        drop = _VOLATILE.get(key, ())
        if key in _VOLATILE and drop is None:
            continue
        if isinstance(value, Mapping) and drop:
            value = {k: v for k, v in value.items() if k not in drop}
        out[key] = value
    return out


def config_hash(resolved: Mapping[str, Any], **extra: Any) -> str:
    """A hash (16 hex digits) of the resolved config (``config.yaml``'s content) without the keys
    that change no number of the table (output folder, ``eval.shard``/``merge``/``progress``/
    ``threads``/``cache_inputs_mib``, ``model.device``, the raw override list), plus ``extra``
    (e.g. the prompt template and the tokenreduce version): shards of one run share it."""
    body = json.dumps({"config": _strip(resolved), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def write_shard_file(folder: Path, shard: Shard, payload: Mapping[str, Any]) -> Path:
    """Write ``folder/shards/<shard file>`` atomically (a temporary file renamed into place, so a
    merge never reads half a file).  ``payload`` must be plain JSON values."""
    target_dir = Path(folder) / SHARD_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / shard.file_name
    body = {"format": FORMAT, "version": VERSION, "shard": shard.index, "shards": shard.count, **payload}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def shard_folder(folder: str | Path) -> Path:
    """The folder holding the shard files: ``folder/shards`` when it exists, else ``folder``."""
    path = Path(folder).expanduser()
    return path / SHARD_DIR if (path / SHARD_DIR).is_dir() else path


def find_shard_files(folder: str | Path) -> list[Path]:
    """The shard files (``shard-<i>-of-<n>.json``) in ``folder/shards`` (or ``folder``), sorted."""
    where = shard_folder(folder)
    if not where.is_dir():
        return []
    return sorted(p for p in where.iterdir() if _FILE.match(p.name) and p.is_file())


def read_shard_file(path: Path) -> dict[str, Any]:
    """One shard file, checked to be one (format, version, shard numbers that match its name)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenReduceError(f"{path}: not a readable shard file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TokenReduceError(f"{path}: not a tokenreduce eval shard file (no format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise TokenReduceError(
            f"{path}: shard file version {data.get('version')!r}; this tokenreduce reads version {VERSION} "
            "(merge with the tokenreduce version that wrote it)"
        )
    match = _FILE.match(path.name)
    assert match is not None
    if (data.get("shard"), data.get("shards")) != (int(match.group(1)), int(match.group(2))):
        raise TokenReduceError(
            f"{path}: the file says shard {data.get('shard')} of {data.get('shards')} but is named for shard "
            f"{int(match.group(1))} of {int(match.group(2))}; a renamed file cannot be merged"
        )
    return data


def load_shards(folder: str | Path, config: str | None = None) -> list[dict[str, Any]]:
    """Every shard file of one run in ``folder/shards`` (or ``folder``), in shard order.

    Args:
        folder: the sharded run's ``out_dir`` (or its ``shards`` folder).
        config: only read the files with this :func:`config_hash` (others are ignored); ``None``:
            every file must belong to the same run.

    Raises:
        TokenReduceError: no shard files; files of different runs (config hash or shard count),
            listed; missing shards, listed.
    """
    where = shard_folder(folder)
    files = find_shard_files(folder)
    if not files:
        raise TokenReduceError(
            f"eval.merge={str(folder)!r}: no shard files (shard-<i>-of-<n>.json) in {where}; give the out_dir of "
            "a sharded eval (eval.shard=i/n or torchrun), or the folder you copied its shards/ files into"
        )
    pairs = [(p, read_shard_file(p)) for p in files]
    if config is not None:
        pairs = [(p, s) for p, s in pairs if s.get("config_hash") == config]
    shards = [s for _, s in pairs]
    if not shards:
        raise TokenReduceError(f"{where}: no shard file of run {config}")
    runs: dict[tuple[Any, Any], list[str]] = {}
    for path, data in pairs:
        runs.setdefault((data.get("config_hash"), data.get("shards")), []).append(path.name)
    if len(runs) > 1:
        listed = "; ".join(f"config {h} with {n} shard(s): {', '.join(names)}" for (h, n), names in runs.items())
        raise TokenReduceError(
            f"{where} holds shard files of {len(runs)} different runs ({listed}); move the files of one run into "
            "their own folder (or remove the stale ones) and merge that"
        )
    count = shards[0]["shards"]
    present = [s["shard"] for s in shards]
    missing = [i for i in range(count) if i not in present]
    if missing:
        raise TokenReduceError(
            f"{where}: {len(missing)} of {count} shard(s) missing: {', '.join(map(str, missing))} (expected "
            f"{', '.join(shard_file_name(i, count) for i in missing)}); run them (eval.shard=i/{count}) or copy "
            "their files here, then merge again"
        )
    return sorted(shards, key=lambda s: s["shard"])


def complete(folder: Path, config: str, count: int) -> bool:
    """Whether ``folder`` holds a file for each of the ``count`` shards of run ``config``."""
    present = set()
    for path in find_shard_files(folder):
        match = _FILE.match(path.name)
        assert match is not None
        if int(match.group(2)) != count:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("config_hash") == config:
            present.add(int(match.group(1)))
    return present == set(range(count))


def other_runs(folder: Path, config: str, count: int) -> list[str]:
    """The shard files in ``folder/shards`` that belong to another run (other hash or count)."""
    others = []
    for path in find_shard_files(folder):
        match = _FILE.match(path.name)
        assert match is not None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            others.append(path.name)
            continue
        if int(match.group(2)) != count or not isinstance(data, dict) or data.get("config_hash") != config:
            others.append(path.name)
    return others


def merge_timing_note(shards: Sequence[Mapping[str, Any]]) -> str:
    """The note a merged table carries about its timing columns."""
    return (
        f"merged from {len(shards)} shards: the time columns ({', '.join(TIMING_FIELDS)}) are the sum over the "
        "shards of each configuration's generate() time (compute time, not wall time); every other number "
        "equals a single-process run"
    )
