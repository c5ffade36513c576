"""vLLM's CPU backend with the plugin against the transformers path on the shipped
easyvqa-qwen2_5_vl (Qwen2.5-VL architecture, M-RoPE): greedy answer tokens equal, question by
question, vanilla and under every supported encoder-side plan with both position policies
(per-request plans on one engine, and one engine-level plan); the patches each plan keeps equal
too; CLS-attention and LLM-side plans refused.  Opt-in: ``bash scripts/vllm_env.sh --test``."""

from __future__ import annotations

import os

import harness as h
import pytest

MISSING = h.vllm_missing()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(bool(MISSING), reason=MISSING)]
N = h.QUESTIONS
CASES = h.cases(h.QWEN)


@pytest.fixture(scope="module")
def expected() -> dict:
    return h.expected(h.QWEN, N)


@pytest.fixture(scope="module")
def llm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return h.make_llm(None, model=h.QWEN)


@pytest.mark.parametrize("name,policy", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_per_request_plan_matches_transformers(llm, expected, name, policy):
    plan = h.plan_for(name, policy, h.QWEN)
    tokens, lengths = h.vllm_generate(llm, h.vllm_prompts(N, plan, per_request=plan is not None, model=h.QWEN))
    want = expected[f"{name}/{policy}"]
    same = sum(a == b for a, b in zip(tokens, want))
    assert same == N, f"{name}/{policy}: {same}/{N} answers equal; vLLM {tokens} transformers {want}"
    if plan is not None:
        _, base = h.vllm_generate(llm, h.vllm_prompts(2, model=h.QWEN))
        assert lengths[0] < base[0], "the reduced prompt is not shorter than the vanilla one"


@pytest.mark.parametrize("name", [name for name in h.QWEN_PLANS if h.QWEN_PLANS[name] is not None])
def test_kept_patches_match_transformers(llm, expected, name):
    """The selection itself, patch by patch, on vLLM's own tower (its fused projections and RoPE
    tables): with ``keep`` positions most plans answer these easy questions like vanilla, so the
    answers alone would not show a different selection."""
    got = h.vllm_kept(llm, N, h.plan_for(name, "keep", h.QWEN), model=h.QWEN)
    want = expected[f"kept:{name}"]
    if name != "divprune":
        assert got == want
        return
    # DivPrune's greedy max-min search breaks near-ties by the last digits of the features, and the
    # two environments' transformers resize the images one grey level apart here and there: a kept
    # token may be swapped for its near-twin, never more than one per image
    swaps = [len(set(a) ^ set(b)) // 2 for a, b in zip(got, want)]
    assert max(swaps) <= 1 and sum(s == 0 for s in swaps) >= 0.75 * N, f"tokens swapped per image: {swaps}"


def test_engine_level_plan_matches_transformers(expected):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = h.make_llm(h.plan_for("visionzip", "keep", h.QWEN), model=h.QWEN)
    tokens, _ = h.vllm_generate(engine, h.vllm_prompts(N, model=h.QWEN))
    assert tokens == expected["visionzip/keep"]


@pytest.mark.parametrize(
    "plan,words",
    [("ref_visionzip_22", ("vision_cls_attention", "no CLS token")), ("qwen_ref_pio_ve_22", ("pio", "transformers"))],
)
def test_unsupported_plan_is_refused_per_request(llm, plan, words):
    with pytest.raises(Exception) as err:
        h.vllm_generate(llm, h.vllm_prompts(1, plan, per_request=True, model=h.QWEN))
    assert all(w in str(err.value) for w in words), str(err.value)
