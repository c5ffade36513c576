"""The model loader: kinds, fallbacks, validation, and synthetic inputs of the right shapes."""

import pytest
import torch

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.models import (
    ModelSettings,
    load_model,
    resolve_attn_implementation,
    resolve_dtype,
    resolve_path,
    synthetic_inputs,
)
from tokenreduce.testing.tiny import llava_config, llava_next_config, qwen2_5_vl_config


def test_tiny_kind_builds_model_and_processor():
    loaded = load_model({"kind": "tiny", "arch": "llava", "text_layers": 2, "image_size": 28, "patch": 14}, name="t")
    assert loaded.n_layers == 2 and loaded.processor is not None and loaded.name == "t"
    info = loaded.describe()
    assert info["dtype"] == "float32" and info["attn_implementation"] == "sdpa" and info["weights"] == "random"


def test_config_kind_builds_random_weights_with_fewer_layers_seeded():
    hf = llava_config().to_dict()
    spec = {"kind": "config", "arch": "llava", "text_layers": 3, "hf_config": hf, "seed": 1}
    a, b = load_model(spec), load_model(spec)
    assert a.processor is None and a.n_layers == 3
    pa, pb = next(a.model.parameters()), next(b.model.parameters())
    assert torch.equal(pa, pb)  # same seed, same weights
    inputs = a.synthetic_inputs(batch_size=2, n_text=10)
    with torch.no_grad():
        assert a.model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize(
    "arch, config, n_visual, expected",
    [
        ("llava", llava_config(), 999, 16),  # fixed by the config's image_seq_length
        ("llava_next", llava_next_config(), None, 88),  # largest pinpoint 112x112: 16 + 8*8 + 8 newlines
        ("llava_next", llava_next_config(), 50, 52),  # 56x112: 16 + 4*8 + 4
        ("qwen2_5_vl", qwen2_5_vl_config(), 36, 36),  # 6x6 merged grid
    ],
)
def test_synthetic_inputs_match_what_the_model_expects(arch, config, n_visual, expected):
    from tokenreduce.testing.tiny import build_tiny

    model = build_tiny(arch, text_layers=1)
    inputs = synthetic_inputs(model.config, arch, 2, n_visual, 14, seed=0)
    image_token = model.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum(-1).tolist() == [expected, expected]
    assert inputs["input_ids"].shape[1] == expected + 14
    with torch.no_grad():
        model(**inputs)  # the model accepts them (features match the image tokens)


def test_validation_names_the_key():
    with pytest.raises(TokenReduceError, match="model.text_layerz: unknown key"):
        load_model({"kind": "tiny", "arch": "llava", "text_layerz": 2})
    with pytest.raises(TokenReduceError, match="needs hf_config"):
        load_model({"kind": "config", "arch": "llava"})
    with pytest.raises(TokenReduceError, match="no such folder"):
        load_model({"kind": "pretrained", "arch": "llava", "path": "/nonexistent/model"})
    with pytest.raises(Exception, match="arch"):
        ModelSettings(kind="tiny", arch="gpt2")


def test_resolution_fallbacks_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu) == "sdpa"
    assert resolve_attn_implementation("flash_attention_2", cpu) == "sdpa"  # no CUDA: falls back
    assert resolve_attn_implementation("eager", cpu) == "eager"
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.float32  # half precision is 5-600x slower on a CPU
    assert resolve_path("pkg:tokenreduce/core").name == "core"
    with pytest.raises(TokenReduceError, match="not installed"):
        resolve_path("pkg:no_such_package_xyz/models")


def test_pretrained_round_trip(tmp_path):
    tiny = load_model({"kind": "tiny", "arch": "llava", "text_layers": 2})
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = load_model({"kind": "pretrained", "arch": "llava", "path": str(tmp_path)})
    assert loaded.processor is not None and loaded.n_layers == 2
    a = next(tiny.model.parameters())
    assert torch.equal(a, next(loaded.model.parameters()))
