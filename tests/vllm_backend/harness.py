"""The vLLM comparison: the same easy-VQA questions answered greedily by the transformers path
(``tokenreduce.apply`` on the shipped reference model) and by vLLM's CPU backend with the plugin,
token ids compared.  ``python tests/vllm_backend/harness.py reference OUT.json`` writes the transformers
side (run it with this repository's main interpreter: vLLM's environment pins an older
transformers); the tests read it from ``$TOKENREDUCE_VLLM_REFERENCE`` or compute it in-process.
``python tests/vllm_backend/harness.py bench [N] [MODEL]`` prints vLLM throughput vanilla vs reduced (docs/vllm.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

MODEL = "easyvqa-llava"
#: questions compared per plan (``TOKENREDUCE_VLLM_QUESTIONS``)
QUESTIONS = int(os.environ.get("TOKENREDUCE_VLLM_QUESTIONS", "24"))
QWEN = "easyvqa-qwen2_5_vl"
STEPS = 4


def vllm_missing() -> str:
    """Why vLLM cannot be used here ("" when it can): the tests' skip reason."""
    try:
        from vllm import LLM  # noqa: F401
    except Exception as exc:  # not installed, or a build that cannot load here
        return f"vLLM is not importable ({type(exc).__name__}); build its environment: bash scripts/vllm_env.sh --test"
    return ""


#: the plans compared (vanilla = no plan); each encoder-side, under both position policies
PLANS = {
    "vanilla": None,
    "uniform_25": {"positions": "keep", "stages": [{"layer": 0, "keep": {"ratio": 0.25}, "selector": "uniform"}]},
    "norm_topk": {"positions": "keep", "stages": [{"layer": 0, "keep": {"ratio": 0.25}, "scorer": "norm"}]},
    "random": "ref_random_22",
    "divprune": "ref_divprune_22",
    "visionzip": "ref_visionzip_22",
    "holov": "ref_holov_22",
    "scope": "ref_scope_22",
    "pio_ve": {
        "positions": "keep",
        "stages": [
            {
                "layer": 0,
                "keep": 24,
                "selector": {"name": "pio_ve", "local_layer": 1, "global_layer": -2, "windows": 4, "merge": True},
            }
        ],
    },
}


#: the plans compared on Qwen2.5-VL: the encoder-side methods in their received-attention forms
#: (its tower has no CLS token) and PIO w/ VE's encoder stage with the Qwen recipe
QWEN_PLANS = {
    "vanilla": None,
    "uniform_25": PLANS["uniform_25"],
    "norm_topk": PLANS["norm_topk"],
    "random": "ref_random_22",
    "divprune": "ref_divprune_22",
    "visionzip": "qwen_ref_visionzip_22",
    "holov": "qwen_ref_holov_22",
    "scope": "qwen_ref_scope_22",
    "pio_ve": {
        "positions": "keep",
        "stages": [
            {
                "layer": 0,
                "keep": 32,
                "selector": {"name": "pio_ve_qwen", "local_layer": 2, "global_layer": -1, "window": 4, "merge": True},
            }
        ],
    },
}
MODELS = {MODEL: PLANS, QWEN: QWEN_PLANS}
ARCH = {MODEL: None, QWEN: "qwen2_5_vl"}


def cases(model: str = MODEL) -> list[tuple[str, str]]:
    """(plan name, policy) pairs compared on ``model``: vanilla once, every plan under both policies."""
    plans = MODELS[model]
    return [(name, policy) for name in plans for policy in (("keep",) if plans[name] is None else ("keep", "renumber"))]


def plan_for(name: str, policy: str, model: str = MODEL):
    """The plan of ``name`` (of ``model``'s plans) with position policy ``policy`` (a validated mapping)."""
    from tokenreduce.core.plan import parse_plan

    spec = MODELS[model][name]
    if spec is None:
        return None
    plan = parse_plan(spec)
    return plan.model_copy(update={"positions": policy}).model_dump(mode="json", exclude_none=True)


def prompt(question: str, model: str = MODEL) -> str:
    from tokenreduce.reference import data

    return data.prompt(question, ARCH[model])


def questions(n: int) -> list[tuple[str, int]]:
    from tokenreduce.reference import data

    split = data.load_split("test")
    return [(split.questions[i], split.image_ids[i]) for i in data.fixed_test_subset(n)]


def expected(model: str, n: int) -> dict[str, list[list[int]]]:
    """The transformers side for ``model``: from ``$TOKENREDUCE_VLLM_REFERENCE`` (written by
    ``harness.py reference``) when set, else computed here."""
    import os

    path = os.environ.get("TOKENREDUCE_VLLM_REFERENCE")
    if not path:
        return reference(n, model=model)
    with open(path) as f:
        data = json.load(f)
    assert data["n"] >= n, f"{path} holds {data['n']} questions; the tests ask for {n}"
    assert model in data["tokens"], f"{path} holds no reference for {model}; rebuild it (harness.py reference)"
    return {k: v[:n] for k, v in data["tokens"][model].items()}


def reference(n: int, policies=("keep", "renumber"), model: str = MODEL) -> dict[str, list[list[int]]]:
    """Greedy answer token ids of the transformers path on ``model``, per ``"<plan>/<policy>"`` (one
    question at a time, as vLLM answers each request on its own)."""
    import torch

    import tokenreduce
    from tokenreduce.reference import data, load_reference

    torch.set_num_threads(2)
    name_of_model = model
    model, processor = load_reference(name_of_model)
    split = data.load_split("test")
    out: dict[str, list[list[int]]] = {}
    plans = MODELS[name_of_model]
    for name in plans:
        for policy in policies if plans[name] is not None else ("keep",):
            plan = plan_for(name, policy, name_of_model)
            rows, kept = [], []
            for question, image_id in questions(n):
                text = [prompt(question, name_of_model)]
                inputs = processor(images=[split.image(image_id)], text=text, return_tensors="pt")
                with torch.no_grad():
                    if plan is None:
                        seq = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
                    else:
                        with tokenreduce.apply(model, plan) as att:
                            seq = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
                        start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
                        kept.append([p - start for p in att.trace.stages[0].kept[0]])
                rows.append(_trim(seq[0, inputs["input_ids"].shape[1] :].tolist()))
            out[f"{name}/{policy}"] = rows
            if plan is not None and policy == "keep":
                out[f"kept:{name}"] = kept  # the patch indices the stage kept, per question
    return out


def _trim(ids: list[int], eos: int = 3) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def make_llm(plan=None, model: str = MODEL, **kwargs):
    from vllm import LLM

    from tokenreduce.integrations.vllm import engine_overrides
    from tokenreduce.reference import reference_dir

    path = str(reference_dir(model))
    args = dict(
        model=path,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=16,
        seed=0,
        hf_overrides=engine_overrides(path, plan),
    )
    args.update(kwargs)
    return LLM(**args)


def vllm_prompts(n: int, plan=None, per_request: bool = False, model: str = MODEL) -> list[dict]:
    from tokenreduce.reference import data

    split = data.load_split("test")
    prompts = []
    for question, image_id in questions(n):
        p = {"prompt": prompt(question, model), "multi_modal_data": {"image": split.image(image_id)}}
        if per_request:
            p["mm_processor_kwargs"] = {"tokenreduce_plan": plan}
        prompts.append(p)
    return prompts


def vllm_kept(llm, n: int, plan, model: str = QWEN) -> list[list[int]]:
    """The patch indices the engine's model keeps of each question's image under ``plan``, read off
    the index channels ``embed_multimodal`` appends (Qwen2.5-VL's reduced class, in-process engine)."""
    from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor
    from tokenreduce.integrations.vllm.encoder import PLAN_KEY, decode_grid_index, plan_field, plan_json
    from tokenreduce.reference import data, reference_dir

    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(str(reference_dir(model)))
    # the processor kwargs the engine uses (rescaling and normalisation on the device, when it does them)
    kwargs = llm.llm_engine.model_config.multimodal_config.merge_mm_processor_kwargs({})
    split = data.load_split("test")
    images = []
    for question, image_id in questions(n):
        text = [prompt(question, model)]
        x = processor(images=[split.image(image_id)], text=text, return_tensors="pt", **kwargs)
        images.append((x["pixel_values"], x["image_grid_thw"]))
    field = plan_field(plan_json(plan)).unsqueeze(0)

    def run(m):
        import torch

        d = m.config.text_config.hidden_size
        out = []
        with torch.inference_mode():
            for pixels, grid in images:
                emb = m.embed_multimodal(pixel_values=pixels, image_grid_thw=grid, **{PLAN_KEY: field})
                out.append(decode_grid_index(emb[0][:, d:].cpu())[0].tolist())
        return out

    return llm.apply_model(run)[0]


def vllm_generate(llm, prompts) -> tuple[list[list[int]], list[int]]:
    """(answer token ids, prompt lengths) per prompt, greedy."""
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0.0), use_tqdm=False)
    return [_trim(list(o.outputs[0].token_ids)) for o in outs], [len(o.prompt_token_ids) for o in outs]


def bench(n: int = 64, repeats: int = 2, model: str = MODEL) -> None:
    """Requests/s and prompt tokens per request on one engine of ``model``, vanilla vs per-request
    plans (``keep`` positions; warm runs without prefix or processor caching, the best of ``repeats``)."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # no prefix cache and no processor cache: every repeat encodes, reduces and prefills again
    llm = make_llm(None, model=model, enable_prefix_caching=False, mm_processor_cache_gb=0)
    vllm_generate(llm, vllm_prompts(4, model=model))  # warm-up
    for name in ("vanilla", "uniform_25", "divprune", "visionzip"):
        plan = plan_for(name, "keep", model)
        prompts = vllm_prompts(n, plan, per_request=plan is not None, model=model)
        vllm_generate(llm, prompts[:4])
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            _, lengths = vllm_generate(llm, prompts)
            best = min(best, time.perf_counter() - t)
        print(
            f"{name:10s} requests={n} best_of_{repeats}={best:.2f}s requests/s={n / best:.2f} "
            f"prompt_tokens/request={sum(lengths) / n:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["reference"]:
        n = int(sys.argv[3]) if len(sys.argv) > 3 else 24
        tokens = {model: reference(n, model=model) for model in MODELS}
        with open(sys.argv[2], "w") as f:
            json.dump({"n": n, "tokens": tokens}, f)
    elif sys.argv[1:2] == ["bench"]:
        bench(int(sys.argv[2]) if len(sys.argv) > 2 else 64, model=sys.argv[3] if len(sys.argv) > 3 else MODEL)
    else:
        raise SystemExit("usage: harness.py reference OUT.json [N] | bench [N] [MODEL]")
