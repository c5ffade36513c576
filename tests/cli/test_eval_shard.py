"""Sharded ``tokenreduce eval``: the split of the work (a partition, deterministic), two local
processes whose merged table equals a single-process run exactly, ``eval.merge``, ``compare`` on
the merged folder, and clear errors for misuse (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenreduce.cli import main
from tokenreduce.cli.compare import cmd_compare
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.shard import (
    TIMING_FIELDS,
    Shard,
    assign_batches,
    config_hash,
    parse_shard,
    resolve_shard,
    shard_from_env,
)
from tokenreduce.measure.tasks import SAMPLE_KEYS, VANILLA, EvalRecords, EvalSettings, summarize

# 5 questions in batches of 2: batches 0 and 2 (3 questions) on shard 0, batch 1 on shard 1
ARGS = [
    "plans=[ref_pio_11,ref_fastv_33]",
    "task.n=5",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
    "eval.progress=false",
    "eval.plot=false",
    "eval.log_samples=true",
    "eval.threads=1",
]


# -- the split ------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_every_batch_is_in_exactly_one_shard_and_the_shards_are_balanced(count):
    for n_batches in range(0, 30):
        shards = assign_batches(n_batches, count)
        assert len(shards) == count
        flat = sorted(b for shard in shards for b in shard)
        assert flat == list(range(n_batches))  # a partition: each batch once
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert all(s == sorted(s) for s in shards)  # each shard runs its batches in the single run's order
        # the same inputs give the same split, whoever asks and whenever
        assert assign_batches(n_batches, count) == shards
        assert [Shard(i, count, "test").batches(n_batches) for i in range(count)] == shards


def test_the_split_depends_only_on_batches_and_shard_count():
    assert assign_batches(5, 2) == [[0, 2, 4], [1, 3]]
    assert assign_batches(2, 3) == [[0], [1], []]  # more shards than batches: an idle shard
    with pytest.raises(ValueError, match="count must be >= 1"):
        assign_batches(3, 0)


@pytest.mark.parametrize("text, expected", [("0/2", (0, 2)), ("1/2", (1, 2)), (" 3 / 4 ", (3, 4)), ("0/1", (0, 1))])
def test_parse_shard_reads_i_of_n_zero_based(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ("3/2", "shard 3 does not exist among 2"),
        ("2/2", "shard 2 does not exist among 2 (shards are numbered from 0)"),
        ("0/0", "the number of shards must be at least 1"),
        ("a/b", "give i/n"),
        ("-1/2", "give i/n"),
        ("1", "give i/n"),
        (1, "one number is not a shard"),
    ],
)
def test_parse_shard_refuses_what_is_not_i_of_n(text, problem):
    with pytest.raises(ValueError, match="0-based") as info:
        parse_shard(text)
    assert problem in str(info.value)


def test_the_shard_comes_from_torchruns_environment_unless_eval_shard_is_given():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert shard_from_env(env) == Shard(1, 4, "RANK=1, WORLD_SIZE=4", 1)
    assert shard_from_env({}) is None
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: not sharded
    assert shard_from_env({"LOCAL_RANK": "0"}) is None  # LOCAL_RANK alone only picks a GPU
    assert resolve_shard("2/3", env) == Shard(2, 3, "eval.shard=2/3", 1)  # eval.shard wins
    assert resolve_shard(None, env) == Shard(1, 4, "RANK=1, WORLD_SIZE=4", 1)
    with pytest.raises(TokenReduceError, match="WORLD_SIZE=2 is set but RANK is not"):
        shard_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(TokenReduceError, match="RANK=2 is not below WORLD_SIZE=2"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(TokenReduceError, match=r"RANK='one' is not an integer"):
        shard_from_env({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(TokenReduceError, match=r"eval.shard='4/4': shard 4 does not exist"):
        resolve_shard("4/4", {})


def test_the_run_hash_ignores_where_and_how_a_shard_runs_but_not_what_it_computes():
    config = {
        "task": {"n": 5},
        "eval": {"batch_size": 2, "shard": "0/2", "threads": 1, "progress": True},
        "model": {"device": "auto", "name": "m"},
        "out_dir": "a",
        "overrides": ["eval.shard=0/2"],
    }
    same = {
        **config,
        "eval": {"batch_size": 2, "shard": "1/2", "threads": 4, "progress": False},
        "model": {"device": "cuda:1", "name": "m"},
        "out_dir": "b",
        "overrides": [],
    }
    assert config_hash(config) == config_hash(same)
    assert config_hash(config) != config_hash({**config, "task": {"n": 6}})
    assert config_hash(config) != config_hash({**config, "eval": {**config["eval"], "batch_size": 4}})
    assert config_hash(config, tokenreduce="1") != config_hash(config, tokenreduce="2")


# -- merging records (no model) --------------------------------------------------------------------
def _records(n: int, seed: int = 0) -> EvalRecords:
    """Synthetic complete records of vanilla and one plan on ``n`` questions."""
    rng = random.Random(seed)
    names = [VANILLA, "p"]
    records = {}
    for name in names:
        records[name] = [
            {
                "doc_id": i,
                "question_id": 100 + i,
                "image_id": i // 3,
                "question": f"q{i}",
                "answer": "red",
                "prediction": rng.choice(["red", "blue"]),
                "correct": rng.random() < 0.5,
                "first_token_agree": rng.random() < 0.8,
                "first_token_kl": 0.0 if name == VANILLA else rng.random() / 7,
                "stage_layers": [] if name == VANILLA else [2],
                "kept_per_stage": [] if name == VANILLA else [16],
                "visual_tokens": 144,
                "layer_average": 144.0 if name == VANILLA else rng.random() * 100,
                "exact_match": rng.random() < 0.7,
                "text_tokens": 20 + i % 3,
                "flops_true": rng.random() * 1e9,
                "flops_paper": rng.random() * 1e8,
                "kv_bytes": float(rng.randrange(10**6)),
                "clamped_stages": int(rng.random() < 0.2),
            }
            for i in range(n)
        ]
    return EvalRecords(
        n_examples=n,
        names=names,
        plans={VANILLA: None, "p": {"stages": []}},
        records=records,
        seconds={VANILLA: 1.5, "p": 1.25},
        select_seconds={VANILLA: 0.0, "p": 0.25},
    )


def _part(whole: EvalRecords, docs: set[int], seconds: float) -> EvalRecords:
    return EvalRecords(
        n_examples=whole.n_examples,
        names=whole.names,
        plans=whole.plans,
        records={n: [r for r in rs if r["doc_id"] in docs] for n, rs in whole.records.items()},
        seconds={n: seconds for n in whole.names},
        select_seconds={n: seconds / 10 for n in whole.names},
    )


def _without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]


def test_records_split_by_batches_and_merged_give_the_single_runs_table_exactly():
    whole = _records(23)
    settings = EvalSettings(batch_size=4, log_samples=True)
    single = summarize(whole, settings, {"name": "t"})
    for count in (2, 3, 6):
        parts = []
        for batches in assign_batches(-(-23 // 4), count):
            docs = {b * 4 + j for b in batches for j in range(4)} & set(range(23))
            parts.append(_part(whole, docs, seconds=0.5))
        random.Random(count).shuffle(parts)  # the order the files are read in does not matter
        merged = summarize(EvalRecords.merge(parts), settings, {"name": "t"})
        assert _without_timing(merged.metrics) == _without_timing(single.metrics)  # ==, not approx
        assert merged.examples == single.examples and merged.notes == single.notes
        assert merged.samples == single.samples and set(merged.samples[VANILLA][0]) == set(SAMPLE_KEYS)
        assert merged.metrics[0]["seconds"] == 0.5 * count  # times add up over the shards


def test_merging_refuses_a_question_twice_or_missing():
    whole = _records(6)
    a, b = _part(whole, {0, 1, 2}, 1.0), _part(whole, {2, 3, 4, 5}, 1.0)
    with pytest.raises(TokenReduceError, match=r"doubled \[2\]"):
        EvalRecords.merge([a, b])
    with pytest.raises(TokenReduceError, match=r"missing doc_id \[3, 4, 5\]"):
        EvalRecords.merge([a])
    other = _records(7)
    with pytest.raises(TokenReduceError, match="must come from one run"):
        EvalRecords.merge([a, _part(other, {3, 4, 5, 6}, 1.0)])


# -- two processes against one -------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "tokenreduce.cli", "eval", *args],
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run, and the same run as two processes started at once: one as torchrun
    starts it (RANK/WORLD_SIZE/LOCAL_RANK in the environment), one as a SLURM array task would
    (eval.shard=1/2).  Both write into one out_dir; the one that finishes last merges."""
    root = tmp_path_factory.mktemp("shard")
    shard0 = _cli(
        *ARGS, f"out_dir={root / 'sharded'}", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, cwd=root
    )
    shard1 = _cli(*ARGS, "eval.shard=1/2", f"out_dir={root / 'sharded'}", cwd=root)
    logs = [p.communicate(timeout=300)[0] for p in (shard0, shard1)]
    assert [shard0.returncode, shard1.returncode] == [0, 0], "\n".join(logs)
    assert main(["eval", *ARGS, f"out_dir={root / 'single'}"]) == 0
    return root, logs


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _table_rows(folder: Path) -> list[list[str]]:
    """The Markdown table's rows without the time column (the last)."""
    lines = [line for line in (folder / "results.md").read_text().splitlines() if line.startswith("| ")]
    return [line.split("|")[1:-2] for line in lines]


def test_the_merged_table_equals_the_single_process_run_exactly(runs):
    root, logs = runs
    assert "shard 0/2 (RANK=0, WORLD_SIZE=2) on cpu: 2 of 3 batches, 3 questions" in logs[0]
    assert "shard 1/2 (eval.shard=1/2) on cpu: 1 of 3 batches, 2 questions" in logs[1]
    assert sum("merged 2 shard files" in log for log in logs) == 1  # the last to finish merged, once
    single, merged = _results(root / "single"), _results(root / "sharded")
    assert [m["name"] for m in merged["metrics"]] == ["vanilla", "ref_pio_11", "ref_fastv_33"]
    assert _without_timing(merged["metrics"]) == _without_timing(single["metrics"])  # every number, ==
    for key in ("task", "examples", "notes"):
        assert merged[key] == single[key], key
    assert _table_rows(root / "sharded") == _table_rows(root / "single")
    for name in ("vanilla", "ref_pio_11", "ref_fastv_33"):
        path = Path("samples") / f"{name}.jsonl"
        assert (root / "sharded" / path).read_text() == (root / "single" / path).read_text()
    # the time columns are marked as summed over the shards, with each shard's own numbers
    sharding = merged["sharding"]
    assert sharding["shards"] == 2 and sharding["timing_fields"] == list(TIMING_FIELDS)
    assert [(s["shard"], s["batches"], s["questions"]) for s in sharding["per_shard"]] == [(0, [0, 2], 3), (1, [1], 2)]
    for m in merged["metrics"]:
        assert m["seconds"] == pytest.approx(sum(s["seconds"][m["name"]] for s in sharding["per_shard"]))
    assert "merged from 2 shards" in (root / "sharded" / "results.md").read_text()
    assert merged["meta"]["command"] == "eval" and merged["meta"]["merged"]["shards"] == 2
    names = sorted(p.name for p in (root / "sharded" / "shards").iterdir())
    assert names == ["shard-00000-of-00002.json", "shard-00001-of-00002.json"]  # no lock or temporary file left


def test_eval_merge_writes_the_same_results_elsewhere_and_compare_reads_them(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "again"
    assert main(["eval", f"eval.merge={root / 'sharded'}", f"out_dir={out}"]) == 0
    again, first = _results(out), _results(root / "sharded")
    assert again["metrics"] == first["metrics"] and again["examples"] == first["examples"]  # timings too: same files
    assert (out / "results.md").is_file() and (out / "config.yaml").is_file()
    # compare takes a merged run like any other
    assert cmd_compare([str(root / "single"), str(out), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]
    by_run = {}
    for row in rows:
        by_run.setdefault(row["config"], []).append(row["accuracy"])
    assert all(len(v) == 2 and v[0] == v[1] for v in by_run.values())
    # a folder with shard files but no results.json yet: compare says to merge first
    pending = tmp_path / "pending"
    shutil.copytree(root / "sharded" / "shards", pending / "shards")
    with pytest.raises(TokenReduceError, match="merge them first with tokenreduce eval eval.merge="):
        cmd_compare([str(pending)])


def test_a_shard_without_batches_writes_an_empty_file_and_the_merge_still_equals_one_process(tmp_path, capsys):
    few = [a for a in ARGS if not a.startswith(("task.n=", "plans=", "eval.log_samples="))]
    few += ["plans=[ref_pio_11]", "task.n=2"]  # one batch for two shards
    out = tmp_path / "idle"
    assert main(["eval", *few, "eval.shard=1/2", f"out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "shard 1/2 (eval.shard=1/2) on cpu: 0 of 1 batches, 0 questions" in printed
    assert "waiting for the other shards" in printed and not (out / "results.json").exists()
    assert main(["eval", *few, "eval.shard=0/2", f"out_dir={out}"]) == 0
    assert "merged 2 shard files" in capsys.readouterr().out
    assert main(["eval", *few, f"out_dir={tmp_path / 'one'}"]) == 0
    merged, single = _results(out), _results(tmp_path / "one")
    assert _without_timing(merged["metrics"]) == _without_timing(single["metrics"])
    assert merged["examples"] == single["examples"] and merged["notes"] == single["notes"]
    assert [s["questions"] for s in merged["sharding"]["per_shard"]] == [2, 0]


# -- misuse ----------------------------------------------------------------------------------------
def _error(capsys, argv) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["3/2", "a/b", "0/0"])
def test_a_bad_eval_shard_is_an_error_naming_the_field(value, capsys):
    err = _error(capsys, ["eval", f"eval.shard={value}"])
    assert "eval.shard" in err and "0-based" in err and repr(value) in err


def test_a_sharded_run_needs_an_out_dir_before_any_work(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _error(capsys, ["eval", *ARGS])
    assert "RANK=1, WORLD_SIZE=2" in err and "needs out_dir=DIR" in err
    monkeypatch.delenv("RANK")
    err = _error(capsys, ["eval", *ARGS, "out_dir=x"])
    assert "WORLD_SIZE=2 is set but RANK is not" in err


def test_merge_lists_missing_shards_and_refuses_files_of_two_runs(runs, tmp_path, capsys):
    root, _ = runs
    shards = root / "sharded" / "shards"
    half = tmp_path / "half"
    (half / "shards").mkdir(parents=True)
    shutil.copy(shards / "shard-00000-of-00002.json", half / "shards")
    err = _error(capsys, ["eval", f"eval.merge={half}"])
    assert "1 of 2 shard(s) missing: 1 (expected shard-00001-of-00002.json)" in err
    # a file of another run (another config) in the same folder
    data = json.loads((shards / "shard-00001-of-00002.json").read_text())
    data["config_hash"] = "0123456789abcdef"
    (half / "shards" / "shard-00001-of-00002.json").write_text(json.dumps(data))
    err = _error(capsys, ["eval", f"eval.merge={half}"])
    assert "shard files of 2 different runs" in err and "config 0123456789abcdef" in err
    # and a run that would write into that folder is refused before any work
    err = _error(capsys, ["eval", *ARGS, "eval.shard=0/3", f"out_dir={half}"])
    assert "already holds shard files of another run" in err and "shard-00000-of-00002.json" in err
    assert not (half / "results.json").exists()


def test_merge_takes_its_config_from_the_shards_only(runs, tmp_path, capsys):
    root, _ = runs
    err = _error(capsys, ["eval", f"eval.merge={root / 'sharded'}", "task.n=7"])
    assert "only out_dir=... may be given with it (got task.n=7)" in err
    err = _error(capsys, ["eval", f"eval.merge={tmp_path / 'nowhere'}"])
    assert "no such folder" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["eval", f"eval.merge={tmp_path / 'empty'}"])
    assert "no shard files" in err
