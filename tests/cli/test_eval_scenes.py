"""``tokenreduce eval model=scenes_llava``: the generated cluttered-scenes task end to end on the
shipped scenes reference model, which selects its own task and suite (here narrowed to a handful of
questions and one plan): the run must complete and write the accuracy per question type and the
noise levels, single and sharded."""

from __future__ import annotations

import json
from pathlib import Path

from tokenreduce.cli import main
from tokenreduce.measure.shard import TIMING_FIELDS
from tokenreduce.measure.tasks import load_task
from tokenreduce.reference import scenes

ARGS = [
    "model=scenes_llava",
    "task.n=6",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
    "eval.progress=false",
    "eval.plot=false",
    "eval.log_samples=true",
    "plans=[scenes_pio_11]",
]


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_the_scenes_task_is_the_fixed_subset_of_the_generated_test_split():
    examples = load_task({"name": "scenes", "n": 6})
    split = scenes.load_split("test")
    assert [ex.index for ex in examples] == scenes.fixed_test_subset(6)  # one recipe for the subset
    for ex in examples:
        assert (ex.question, ex.answer, ex.qtype) == (
            split.questions[ex.index],
            split.answers[ex.index],
            split.types[ex.index],
        )
        assert ex.image_path is None and ex.image().tobytes() == split.image(ex.image_id).tobytes()


def test_eval_on_scenes_writes_accuracy_by_type_and_the_merged_shards_equal_it(tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["eval", *ARGS, f"out_dir={single}"]) == 0
    assert "scenes (test, 6 questions, seed 0)" in capsys.readouterr().out
    results = _results(single)
    assert results["task"]["name"] == "scenes" and [m["name"] for m in results["metrics"]] == [
        "vanilla",
        "scenes_pio_11",
    ]
    types = [ex.qtype for ex in load_task({"name": "scenes", "n": 6})]
    for m in results["metrics"]:
        by_type = m["accuracy_by_type"]
        assert list(by_type) == [t for t in scenes.QUESTION_TYPES if t in types]
        assert {t: v["n"] for t, v in by_type.items()} == {t: types.count(t) for t in by_type}
        assert sum(v["accuracy"] * v["n"] for v in by_type.values()) == round(m["accuracy"] * 6)
        lo, hi = m["accuracy_ci"]
        assert 0.0 <= lo <= m["accuracy"] <= hi <= 1.0
    plan = results["metrics"][1]
    assert plan["only_plan_correct"] >= 0 and plan["only_vanilla_correct"] >= 0 and "accuracy_diff_ci" in plan
    md = (single / "results.md").read_text()
    assert "Accuracy by question type:" in md and "| Δ acc [95%] |" in md
    sample = json.loads((single / "samples" / "vanilla.jsonl").read_text().splitlines()[0])
    assert sample["qtype"] == types[0]

    # the same run in two shards, merged by the second: equal numbers, new fields included
    sharded = tmp_path / "sharded"
    assert main(["eval", *ARGS, "eval.shard=1/2", f"out_dir={sharded}"]) == 0
    assert main(["eval", *ARGS, "eval.shard=0/2", f"out_dir={sharded}"]) == 0
    assert "merged 2 shard files" in capsys.readouterr().out
    merged = _results(sharded)

    def strip(metrics):
        return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]

    assert strip(merged["metrics"]) == strip(results["metrics"])
    assert merged["examples"] == results["examples"]
