"""``eval.log_samples=true`` writes one JSONL file per configuration, one line per question, whose
fields agree with the run's metrics; progress off a terminal is one line per configuration."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from tqdm import tqdm

from tokenreduce.cli import main
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.progress import LineProgress, progress_bar
from tokenreduce.measure.tasks import EvalResult

PLANS = ["ref_pio_11", "ref_fastv_33"]
N = 5
FIELDS = {
    "doc_id",
    "question_id",
    "image_id",
    "question",
    "answer",
    "prediction",
    "correct",
    "first_token_agree",
    "first_token_kl",
    "stage_layers",
    "kept_per_stage",
    "visual_tokens",
    "layer_average",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("log_samples")
    argv = ["eval", f"plans=[{','.join(PLANS)}]", f"task.n={N}", "eval.batch_size=3", "eval.max_new_tokens=2"]
    stderr = io.StringIO()  # not a terminal: the progress must be plain lines
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "eval.log_samples=true", "eval.progress=true", f"out_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    samples = {}
    for name in ["vanilla", *PLANS]:
        lines = (out / "samples" / f"{name}.jsonl").read_text().splitlines()
        samples[name] = [json.loads(line) for line in lines]
    return out, results, samples, stderr.getvalue()


def test_one_jsonl_per_configuration_one_line_per_question(run):
    out, results, samples, _ = run
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(f"{n}.jsonl" for n in ["vanilla", *PLANS])
    examples = results["examples"]
    for name, records in samples.items():
        assert len(records) == N
        for i, rec in enumerate(records):
            assert set(rec) == FIELDS
            assert rec["doc_id"] == i and rec["question_id"] == examples[i]["index"]
            assert rec["question"] == examples[i]["question"] and rec["answer"] == examples[i]["gold"]
            assert rec["prediction"] == examples[i]["answers"][name]


def test_sample_fields_agree_with_the_metrics(run):
    _, results, samples, _ = run
    metrics = {m["name"]: m for m in results["metrics"]}
    for name, records in samples.items():
        m = metrics[name]
        assert sum(r["correct"] for r in records) / N == pytest.approx(m["accuracy"])
        assert sum(r["first_token_agree"] for r in records) / N == pytest.approx(m["first_token_agreement"])
        assert sum(r["first_token_kl"] for r in records) / N == pytest.approx(m["first_token_kl"], abs=1e-9)
        assert sum(r["layer_average"] for r in records) / N == pytest.approx(m["layer_average"])
    assert all(r["first_token_kl"] == 0.0 and r["kept_per_stage"] == [] for r in samples["vanilla"])
    # the kept counts are the stages' keeps of the plans (conf/plan/ref_fastv_33.yaml: 144 -> 16 after layer 1)
    plans = results["metrics"]
    fastv = next(p["plan"] for p in plans if p["name"] == "ref_fastv_33")
    keeps = [st["keep"]["tokens"] for st in fastv["stages"]]
    for rec in samples["ref_fastv_33"]:
        assert rec["stage_layers"] == [st["layer"] for st in fastv["stages"]]
        assert rec["kept_per_stage"] == keeps and rec["visual_tokens"] == 144
    assert all(len(r["kept_per_stage"]) == 3 for r in samples["ref_pio_11"])


def test_progress_off_a_terminal_is_one_line_per_configuration(run):
    *_, stderr = run
    assert "\r" not in stderr  # neither the evaluation's bar nor transformers' weight-loading bar
    lines = [line for line in stderr.splitlines() if line.startswith("eval: ")]
    assert [line.split(" done")[0] for line in lines] == [f"eval: {n}" for n in ["vanilla", *PLANS]]
    assert lines[-1].endswith(f"[{N * 3}/{N * 3}]")


def test_line_progress_prints_a_line_when_a_phase_ends():
    stream = io.StringIO()
    bar = progress_bar(6, "bench", file=stream)
    assert isinstance(bar, LineProgress)
    for phase in ("a", "b"):
        bar.set_postfix_str(phase)
        bar.update(2)
        bar.set_postfix_str(phase)  # the same phase again: no line
    bar.update(2)
    bar.close()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("bench: a done: 2 in ") and lines[0].endswith("[2/6]")
    assert lines[1].startswith("bench: b done: 4 in ") and lines[1].endswith("[6/6]")
    quiet = io.StringIO()
    off = progress_bar(3, "eval", enabled=False, file=quiet)
    off.set_postfix_str("x")
    off.update(3)
    off.close()
    assert quiet.getvalue() == ""
    assert isinstance(progress_bar(3, "eval", file=io.StringIO(), tty=True), tqdm)  # a terminal: a bar


def test_write_samples_without_samples_is_a_clear_error(tmp_path):
    result = EvalResult(task={}, metrics=[], examples=[], notes=[])
    with pytest.raises(TokenReduceError, match="eval.log_samples=true"):
        result.write_samples(tmp_path)
