"""The GPU benchmark script (``benchmarks/gpu.sh`` -> ``benchmarks/gpu_bench.py``) on the CPU.

``--cpu-smoke`` runs the script's whole code path with tiny widths (parity of sdpa against eager
for every preset, the speed tables at batch 1 and 2, the report files), so the GPU script cannot
rot between the runs on a lent GPU.  The parity comparison itself is checked on hand-made
generations that differ, so that it is known to report a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"
WRAPPER = REPO / "benchmarks" / "gpu.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_bench = _load()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}


def test_cpu_smoke_through_the_wrapper(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", str(WRAPPER), "--cpu-smoke", "--no-progress", "--out", str(out)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and not report["skipped"], report["skipped"] + report["notes"]
    assert report["settings"]["smoke"] and report["settings"]["parity_impls"] == ["eager", "sdpa"]
    assert report["settings"]["batch_sizes"] == [1, 2]
    assert set(report["models"]) == {"llava_1_5_7b", "llava_next_7b"}
    assert all(m["decoder_layers"] == 32 and m["dtype"] == "float32" for m in report["models"].values())

    # parity: vanilla and every preset, sdpa against eager, kept sets identical, logits within tolerance
    rows = {(r["model"], r["plan"]): r for r in report["parity"]}
    expected = {(m, p) for m, plans in gpu_bench.PARITY_PLANS.items() for p in ["vanilla", *plans]}
    assert set(rows) == expected
    for (_, plan), row in rows.items():
        assert row["impl"] == "sdpa" and row["reference"] == "eager"
        assert row["status"] == "ok", row
        assert row["logits_within_tolerance"] and row["tokens_equal"]
        assert row["logits_max_abs_diff"] < 1e-3
        if plan == "vanilla":
            assert row["kept_equal"] is None
        else:
            assert row["kept_equal"] is True and row["kept_overlap_min"] == 1.0
            # the plan did cut: fewer visual tokens after its last stage than before its first
            assert row["visual_after"] and all(n < 576 for n in row["visual_after"][-1])

    # speed: vanilla and every plan at batch 1 and 2, speed-ups against vanilla
    runs = {(e["model"], e["batch_size"]): e for e in report["speed"]}
    assert set(runs) == {(m, b) for m in gpu_bench.SPEED_PLANS for b in (1, 2)}
    for (model, batch), entry in runs.items():
        assert "error" not in entry, entry.get("error")
        result = entry["result"]
        assert result["inputs"]["batch_size"] == batch
        configs = {c["name"]: c for c in result["configs"]}
        assert list(configs) == ["vanilla", *gpu_bench.SPEED_PLANS[model]]
        for name, c in configs.items():
            assert c["e2e_s"]["median"] > 0 and c["prefill_s"]["median"] > 0
            if name != "vanilla":
                assert c["speedup"]["prefill"] > 0 and c["speedup"]["e2e"] > 0
                assert c["layer_average"] < configs["vanilla"]["layer_average"]

    md = (out / "report.md").read_text()
    for heading in [
        "## Parity (reference: eager)",
        "## Speed: llava_1_5_7b, batch 1",
        "## Speed: llava_next_7b, batch 2",
    ]:
        assert heading in md
    log = (out / "gpu.log").read_text()
    assert "== environment" in log and "flash-attn:" in log and "rows at parity" in log


def test_over_budget_parts_are_skipped_and_reported(tmp_path):
    assert gpu_bench.main(["--cpu-smoke", "--no-progress", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["complete"] and not report["models"] and not report["parity"] and not report["speed"]
    assert len(report["skipped"]) == 2 and all("budget" in s for s in report["skipped"])
    assert "## Skipped and notes" in (tmp_path / "report.md").read_text()


def _generation(kept, tokens, logits):
    return gpu_bench.Generation(
        kept=kept, visual_after=[[len(k) for k in st] for st in kept], tokens=torch.tensor(tokens), logits=logits
    )


def test_compare_reports_mismatches():
    logits = torch.randn(2, 3, 10)
    ref = _generation([[[1, 2, 3], [4, 5, 6]]], [[1, 2, 3], [4, 5, 6]], logits)
    same = gpu_bench.compare(ref, _generation([[[3, 2, 1], [4, 5, 6]]], [[1, 2, 3], [4, 5, 6]], logits + 1e-4), 1e-3, 0)
    assert same["status"] == "ok" and same["kept_equal"] and same["steps_compared"] == 3

    other = _generation([[[1, 2, 7], [4, 5, 6]]], [[1, 2, 3], [4, 5, 6]], logits)
    row = gpu_bench.compare(ref, other, 1e-3, 0)
    assert row["status"] == "kept sets differ" and row["kept_equal"] is False
    assert row["kept_overlap_min"] == pytest.approx(2 / 3)

    # logits beyond tolerance, compared up to and including the first step whose token differs
    shifted = logits.clone()
    shifted[0, 2] += 1.0  # after the divergence at step 1: not compared
    diverged = gpu_bench.compare(ref, _generation(ref.kept, [[1, 9, 3], [4, 5, 6]], shifted), 1e-3, 0)
    assert diverged["status"] == "ok" and diverged["steps_compared"] == 2 and not diverged["tokens_equal"]
    shifted[1, 0, 4] += 0.01
    far = gpu_bench.compare(ref, _generation(ref.kept, [[1, 2, 3], [4, 5, 6]], shifted), 1e-3, 0)
    assert far["status"] == "logits beyond tolerance" and not far["logits_within_tolerance"]
    assert far["logits_max_abs_diff"] == pytest.approx(1.0)


def test_left_pad():
    ids = torch.tensor([[1, 5, 9, 9, 9, 6, 7, 8], [1, 5, 9, 9, 9, 6, 7, 8]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(2, 3)}
    padded = gpu_bench.left_pad(inputs, 2, 0, 9)
    assert padded["input_ids"][1].tolist() == [0, 0, 1, 5, 9, 9, 9, 6]
    assert padded["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert torch.equal(padded["input_ids"][0], ids[0]) and padded["pixel_values"] is inputs["pixel_values"]
    assert gpu_bench.left_pad(inputs, 0, 0, 9) is inputs
    with pytest.raises(ValueError, match="--parity-pad 3 must be below the 3 text tokens after the image"):
        gpu_bench.left_pad(inputs, 3, 0, 9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_wrapper_refuses_without_cuda(tmp_path):
    proc = subprocess.run(
        ["bash", str(WRAPPER), "--out", str(tmp_path / "gpu")], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "gpu").exists()


class _FakeModel:
    """What use_kernel touches of a VLM: ``config.text_config`` and ``set_attn_implementation``."""

    def __init__(self, vision_refuses: str | None = None, ignore: bool = False):
        self.config = SimpleNamespace(text_config=SimpleNamespace(_attn_implementation="eager"))
        self.vision_refuses, self.ignore, self.calls = vision_refuses, ignore, []

    def set_attn_implementation(self, impl):
        self.calls.append(impl)
        if impl == self.vision_refuses:
            raise ValueError(f"CLIPVisionModel does not support {impl}\nmore detail")
        if not self.ignore:
            self.config.text_config._attn_implementation = impl["text_config"] if isinstance(impl, dict) else impl


def test_use_kernel_switches_the_language_model_and_checks_it():
    model = _FakeModel()
    assert gpu_bench.use_kernel(model, "sdpa") is None and model.config.text_config._attn_implementation == "sdpa"
    # a vision tower that refuses the kernel: the language model alone switches, with a note
    model = _FakeModel(vision_refuses="flash_attention_2")
    note = gpu_bench.use_kernel(model, "flash_attention_2")
    assert (
        note
        == "vision tower on sdpa (flash_attention_2 refused there: CLIPVisionModel does not support flash_attention_2)"
    )
    assert model.calls[-1] == {"text_config": "flash_attention_2", "vision_config": "sdpa"}
    with pytest.raises(ValueError, match="does not support eager"):  # the reference kernel has no fallback
        gpu_bench.use_kernel(_FakeModel(vision_refuses="eager"), "eager")
    with pytest.raises(RuntimeError, match="runs 'eager' after switching to 'sdpa'"):  # a switch that did not happen
        gpu_bench.use_kernel(_FakeModel(ignore=True), "sdpa")


def test_a_failing_kernel_is_reported_not_raised(tmp_path, monkeypatch):
    real = gpu_bench.use_kernel

    def broken_sdpa(model, impl):
        if impl == "sdpa":
            raise RuntimeError("sdpa kernel exploded")
        return real(model, impl)

    monkeypatch.setattr(gpu_bench, "use_kernel", broken_sdpa)
    argv = ["--cpu-smoke", "--no-progress", "--models", "llava_next_7b", "--parity-tokens", "2", "--out", str(tmp_path)]
    assert gpu_bench.main([*argv, "--skip-speed"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["plan"], r["status"]) for r in report["parity"]] == [("vanilla", "error"), ("next_pio_11", "error")]
    assert all("sdpa kernel exploded" in r["error"] for r in report["parity"])
    assert len(report["errors"]) == 2 and report["complete"]
    md = (tmp_path / "report.md").read_text()
    assert "## Errors" in md and "error: RuntimeError: sdpa kernel exploded" in md
