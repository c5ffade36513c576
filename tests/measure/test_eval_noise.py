"""Noise levels of the evaluation: the bootstrap interval of each configuration's accuracy, the
paired difference to vanilla, the accuracy per question type, and that a sharded run's merged
records give the same numbers as a single run."""

from __future__ import annotations

import random

import pytest

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.shard import assign_batches
from tokenreduce.measure.tasks import (
    SAMPLE_KEYS,
    VANILLA,
    EvalRecords,
    EvalSettings,
    bootstrap_noise,
    summarize,
)


def _flags(n: int, rate: float, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < rate for _ in range(n)]


def test_the_bootstrap_is_deterministic_and_its_intervals_hold_the_point_estimates():
    correct = {VANILLA: _flags(400, 0.8, 0), "a": _flags(400, 0.7, 1), "b": _flags(400, 0.5, 2)}
    first = bootstrap_noise(correct)
    assert bootstrap_noise(correct) == first  # a fixed seed: the same intervals every time
    assert bootstrap_noise(correct, seed=1) != first  # ... and the seed is what fixes them
    for name, flags in correct.items():
        acc = sum(flags) / len(flags)
        lo, hi = first[name]["accuracy_ci"]
        assert lo < acc < hi and hi - lo < 0.15
        if name != VANILLA:
            diff = first[name]["accuracy_diff"]
            d_lo, d_hi = first[name]["accuracy_diff_ci"]
            assert diff == pytest.approx(acc - sum(correct[VANILLA]) / 400) and d_lo < diff < d_hi
    assert set(first[VANILLA]) == {"accuracy_ci"}  # vanilla is not compared with itself
    # the ends are accuracies of resamples: multiples of 1/n, exactly
    for name in correct:
        for end in (*first[name]["accuracy_ci"], *first[name].get("accuracy_diff_ci", ())):
            assert end * 400 == round(end * 400)


def test_paired_counts_and_difference_on_hand_made_answers():
    vanilla = [True, True, False, False, True, True]
    plan = [True, False, True, False, False, True]
    out = bootstrap_noise({VANILLA: vanilla, "plan": plan})["plan"]
    assert out["only_plan_correct"] == 1 and out["only_vanilla_correct"] == 2
    assert out["accuracy_diff"] == pytest.approx(-1 / 6)
    # the same answers as vanilla: a zero difference with a zero-width interval
    same = bootstrap_noise({VANILLA: vanilla, "copy": list(vanilla)})["copy"]
    assert same["accuracy_diff"] == 0.0 and same["accuracy_diff_ci"] == [0.0, 0.0]
    assert same["only_plan_correct"] == same["only_vanilla_correct"] == 0
    # every answer right: nothing to resample away
    assert bootstrap_noise({VANILLA: [True] * 5})[VANILLA]["accuracy_ci"] == [1.0, 1.0]


def test_the_interval_narrows_with_more_questions():
    widths = []
    for n in (50, 500, 5000):
        lo, hi = bootstrap_noise({VANILLA: _flags(n, 0.7, n)})[VANILLA]["accuracy_ci"]
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    # roughly 1/sqrt(n): the normal approximation's 2 * 1.96 * sqrt(p (1 - p) / n) at n = 5000
    assert widths[2] == pytest.approx(2 * 1.96 * (0.7 * 0.3 / 5000) ** 0.5, rel=0.2)


def test_a_paired_difference_is_narrower_than_two_independent_intervals():
    vanilla = _flags(1000, 0.8, 3)
    plan = list(vanilla)
    for i in range(0, 1000, 50):  # the plan differs from vanilla on 20 questions only
        plan[i] = not plan[i]
    out = bootstrap_noise({VANILLA: vanilla, "plan": plan})
    d_lo, d_hi = out["plan"]["accuracy_diff_ci"]
    lo, hi = out["plan"]["accuracy_ci"]
    assert d_hi - d_lo < (hi - lo) / 2


@pytest.mark.parametrize(
    ("correct", "base", "problem"),
    [
        ({"a": [True]}, VANILLA, "base configuration 'vanilla' is not among"),
        ({VANILLA: []}, VANILLA, "same n >= 1 questions"),
        ({VANILLA: [True, False], "a": [True]}, VANILLA, "same n >= 1 questions"),
    ],
)
def test_bootstrap_refuses_what_it_cannot_resample(correct, base, problem):
    with pytest.raises(TokenReduceError, match=problem):
        bootstrap_noise(correct, base=base)
    with pytest.raises(TokenReduceError, match="resamples=0 must be >= 1"):
        bootstrap_noise({VANILLA: [True]}, resamples=0)


# -- through summarize() ---------------------------------------------------------------------------
TYPES = ("count", "exists", "relation")


def _records(n: int, typed: bool, seed: int = 0) -> EvalRecords:
    """Synthetic complete records of vanilla and two plans on ``n`` questions (with types or without)."""
    rng = random.Random(seed)
    names = [VANILLA, "p", "q"]
    records = {}
    for name in names:
        records[name] = [
            {
                "doc_id": i,
                "question_id": 100 + i,
                "image_id": i // 3,
                "question": f"q{i}",
                "answer": "red",
                "prediction": "red",
                "correct": rng.random() < 0.6,
                "first_token_agree": True,
                "first_token_kl": 0.0,
                "stage_layers": [],
                "kept_per_stage": [],
                "visual_tokens": 144,
                "layer_average": 144.0,
                "exact_match": True,
                "text_tokens": 20,
                "flops_true": 1e9,
                "flops_paper": 1e8,
                "kv_bytes": 1e6,
                "clamped_stages": 0,
                "qtype": TYPES[i % 3] if typed else None,
            }
            for i in range(n)
        ]
    return EvalRecords(
        n_examples=n,
        names=names,
        plans={VANILLA: None, "p": {"stages": []}, "q": {"stages": []}},
        records=records,
        seconds=dict.fromkeys(names, 1.0),
        select_seconds=dict.fromkeys(names, 0.0),
    )


def test_summarize_writes_the_noise_levels_and_the_accuracy_by_question_type():
    whole = _records(31, typed=True)
    result = summarize(whole, EvalSettings(log_samples=True), {"name": "scenes"})
    noise = bootstrap_noise({name: [r["correct"] for r in whole.records[name]] for name in whole.names})
    for m in result.metrics:
        recs = whole.records[m["name"]]
        assert m["accuracy_ci"] == noise[m["name"]]["accuracy_ci"]
        expected = {}
        for t in TYPES:
            flags = [r["correct"] for r in recs if r["qtype"] == t]
            expected[t] = {"accuracy": sum(flags) / len(flags), "n": len(flags)}
        assert m["accuracy_by_type"] == expected and list(m["accuracy_by_type"]) == sorted(TYPES)
        if m["name"] != VANILLA:
            base = whole.records[VANILLA]
            assert m["only_plan_correct"] == sum(r["correct"] and not b["correct"] for r, b in zip(recs, base))
            assert m["only_vanilla_correct"] == sum(b["correct"] and not r["correct"] for r, b in zip(recs, base))
    md = result.markdown()
    # the noise columns come before the time column, the existing columns keep their order
    assert "| KV MiB | ± | Δ acc [95%] | only plan/vanilla right | s |" in md
    p = result.metrics[1]
    lo, hi = p["accuracy_ci"]
    d_lo, d_hi = p["accuracy_diff_ci"]
    cells = f"| {(hi - lo) / 2:.3f} | {p['accuracy_diff']:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}] | "
    assert cells + f"{p['only_plan_correct']}/{p['only_vanilla_correct']} |" in md
    assert "| 1.00 |" in md.splitlines()[4] and "| - | - | 1.00 |" in md  # vanilla's row: no difference
    assert "| config | count (n=11) | exists (n=10) | relation (n=10) |" in md
    assert result.samples["p"][0]["qtype"] == "count" and set(result.samples["p"][0]) == {*SAMPLE_KEYS, "qtype"}


def test_without_question_types_nothing_per_type_is_written():
    result = summarize(_records(12, typed=False), EvalSettings(log_samples=True), {"name": "easy_vqa"})
    assert all("accuracy_by_type" not in m and "accuracy_ci" in m for m in result.metrics)
    md = result.markdown()
    assert "question type" not in md and "| ± |" in md
    assert "±" not in result.table()  # the printed table keeps its columns
    assert set(result.samples[VANILLA][0]) == set(SAMPLE_KEYS)  # the easy-VQA sample lines are unchanged
    # records of a shard file written before question types existed read as untyped
    old = _records(12, typed=False)
    for recs in old.records.values():
        for r in recs:
            del r["qtype"]
    assert summarize(old, EvalSettings(log_samples=True)).metrics == result.metrics


def test_merged_shards_give_the_single_runs_noise_levels_and_types_exactly():
    whole = _records(23, typed=True, seed=5)
    settings = EvalSettings(batch_size=4, log_samples=True)
    single = summarize(whole, settings, {"name": "scenes"})
    for count in (2, 3):
        parts = []
        for batches in assign_batches(-(-23 // 4), count):
            docs = {b * 4 + j for b in batches for j in range(4)} & set(range(23))
            parts.append(
                EvalRecords(
                    n_examples=23,
                    names=whole.names,
                    plans=whole.plans,
                    records={n: [r for r in rs if r["doc_id"] in docs] for n, rs in whole.records.items()},
                    seconds=dict.fromkeys(whole.names, 1.0),
                    select_seconds=dict.fromkeys(whole.names, 0.0),
                )
            )
        random.Random(count).shuffle(parts)
        merged = summarize(EvalRecords.from_dict(EvalRecords.merge(parts).to_dict()), settings, {"name": "scenes"})
        for a, b in zip(merged.metrics, single.metrics):
            for key in ("accuracy_ci", "accuracy_diff", "accuracy_diff_ci", "only_plan_correct", "accuracy_by_type"):
                assert a.get(key) == b.get(key)  # ==, not approx
        assert merged.samples == single.samples
