"""GPU checks: the cut and the signals under flash_attention_2 / sdpa in fp16 on CUDA.

Skipped without CUDA (CI has none); run on a lent GPU machine with ``python -m pytest tests/gpu``.
These check tiny models in seconds; ``benchmarks/gpu.sh`` checks the same parity on the 7B shapes
with every preset (kept sets against eager, logits within a bf16 tolerance) and times them.
"""

import importlib.util

import pytest
import torch

import tokenreduce
from tokenreduce.testing.tiny import build_tiny, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PLAN = {
    "positions": "renumber",
    "stages": [
        {"layer": 1, "keep": 10, "scorer": "pio", "selector": "nms"},
        {"layer": 2, "keep": 6, "scorer": "fastv", "selector": "topk"},
    ],
}
IMPLS = ["sdpa", "eager"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def run(impl, dtype):
    model = build_tiny("llava", attn_implementation=impl, dtype=dtype).cuda()
    inputs = make_inputs(
        "llava", ["USER: <image> what color is the shape? ASSISTANT:", "USER: <image> shape? ASSISTANT:"]
    )
    inputs = {k: (v.cuda().to(dtype) if v.is_floating_point() else v.cuda()) for k, v in inputs.items()}
    with tokenreduce.apply(model, PLAN) as att:
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return att.trace, torch.stack(out.logits, 1).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_with_sdpa(impl, dtype):
    ref_trace, ref_logits = run("sdpa", dtype)
    trace, logits = run(impl, dtype)
    for st, ref in zip(trace.stages, ref_trace.stages):
        assert st.visual_after == ref.visual_after
        # the selections may differ only where scores tie within dtype noise: require large overlap
        for kept, ref_kept in zip(st.kept, ref.kept):
            assert len(set(kept) & set(ref_kept)) >= 0.8 * len(ref_kept)
    torch.testing.assert_close(logits, ref_logits, atol=5e-2, rtol=5e-2)
