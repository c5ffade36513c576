"""vLLM's CPU backend with the plugin against the transformers path on the shipped easyvqa-llava:
greedy answer tokens equal, question by question, vanilla and under every supported encoder-side
plan with both position policies (per-request plans on one engine, and one engine-level plan);
LLM-side plans refused with the stages named.  Opt-in: ``bash scripts/vllm_env.sh --test``."""

from __future__ import annotations

import os

import harness as h
import pytest

MISSING = h.vllm_missing()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(bool(MISSING), reason=MISSING)]
N = h.QUESTIONS
CASES = h.cases(h.MODEL)


@pytest.fixture(scope="module")
def expected() -> dict:
    return h.expected(h.MODEL, N)


@pytest.fixture(scope="module")
def llm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return h.make_llm(None)


@pytest.mark.parametrize("name,policy", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_per_request_plan_matches_transformers(llm, expected, name, policy):
    plan = h.plan_for(name, policy)
    tokens, lengths = h.vllm_generate(llm, h.vllm_prompts(N, plan, per_request=plan is not None))
    want = expected[f"{name}/{policy}"]
    same = sum(a == b for a, b in zip(tokens, want))
    assert same == N, f"{name}/{policy}: {same}/{N} answers equal; vLLM {tokens} transformers {want}"
    if plan is not None:
        vanilla, base = h.vllm_generate(llm, h.vllm_prompts(2))
        assert lengths[0] < base[0], "the reduced prompt is not shorter than the vanilla one"


def test_engine_level_plan_matches_transformers(expected):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = h.make_llm(h.plan_for("divprune", "keep"))
    tokens, _ = h.vllm_generate(engine, h.vllm_prompts(N))
    assert tokens == expected["divprune/keep"]


def test_llm_side_plan_is_refused_per_request(llm):
    prompts = h.vllm_prompts(1, "ref_fastv_22", per_request=True)
    with pytest.raises(Exception) as err:
        h.vllm_generate(llm, prompts)
    message = str(err.value)
    assert "fastv" in message and "transformers" in message


def test_llm_side_plan_is_refused_by_engine_overrides():
    from tokenreduce.core.errors import PlanError
    from tokenreduce.integrations.vllm import engine_overrides
    from tokenreduce.reference import reference_dir

    with pytest.raises(PlanError, match="stages.1 .*inside the decoder"):
        engine_overrides(reference_dir(h.MODEL), "ref_pio_ve_11")
