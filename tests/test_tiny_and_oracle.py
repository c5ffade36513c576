"""The tiny test models build and generate; the hand-written oracle decode matches ``generate()``."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_generate, oracle_inputs_embeds

from tokenreduce.testing.tiny import (
    IMAGE_TOKEN_ID,
    KINDS,
    build_tiny,
    make_image,
    make_inputs,
    make_tokenizer,
)

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
PROMPTS = [PROMPT, "USER: <image> is there a red circle in the image? ASSISTANT:"]
N_VISUAL = {
    "llava": 16,
    "llava_next": 70,
    "llava_onevision": 44,
    "qwen2_5_vl": 12,
    "qwen2_vl": 12,
    "qwen3_vl": 12,
}  # default image sizes
STEPS = 5


def _generate(model, inputs, **kw):
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True, **kw
    )
    tokens = out.sequences[0, -len(out.logits) :].tolist()
    return tokens, torch.cat(out.logits)  # [steps, V]


def _assert_matches(oracle, reference):
    (o_tokens, o_logits), (r_tokens, r_logits) = oracle, reference
    n = len(r_tokens)  # generate() may stop early on EOS; the oracle never does
    assert o_tokens[:n] == r_tokens
    torch.testing.assert_close(o_logits[:n], r_logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- tokenizer, images


def test_tokenizer_special_ids_and_no_unk():
    tok = make_tokenizer()
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(8))
    assert tok.padding_side == "left"
    text = PROMPT + " Which shape is blue, green or yellow? Yes no. How many circles are there?"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert ids.count(IMAGE_TOKEN_ID) == 1


def test_make_image_is_deterministic_and_varies():
    a, b, c = make_image(3), make_image(3), make_image(4)
    assert a.mode == "RGB" and a.size == (56, 56)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert make_image(0, size=(100, 80)).size == (100, 80)


# ------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_builds_and_generates(kind):
    model = build_tiny(kind)
    assert not model.training
    inputs = make_inputs(kind, PROMPTS)
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 2
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding
    placeholder = model.config.image_token_id
    assert (input_ids == placeholder).sum(-1).tolist() == [N_VISUAL[kind]] * 2

    out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    new = out[:, input_ids.shape[1] :]
    assert new.shape == (2, 8)
    for row in new.tolist():  # non-degenerate weights: not one token repeated
        assert len(set(row)) >= 4, row
    assert new[0].tolist() != new[1].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_deterministic_and_leaves_global_rng_alone(kind):
    state = torch.random.get_rng_state()
    a, b, c = build_tiny(kind, seed=0), build_tiny(kind, seed=0), build_tiny(kind, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_attention_is_not_uniform():
    """Weights drawn with std 0.2: the last query attends sharply (std 0.02 gives ~uniform attention)."""
    model = build_tiny("llava", attn_implementation="eager")
    inputs = make_inputs("llava", [PROMPT])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions  # L x [1, heads, S, S]
    for probs in attentions:
        assert probs[0, :, -1].max() > 0.3  # uniform would be 1 / S < 0.04


def test_llava_image_size_and_text_layers():
    model = build_tiny("llava", image_size=28, patch=14, text_layers=2)
    assert len(model.model.language_model.layers) == 2
    assert model.config.image_seq_length == 4


# ------------------------------------------------------------------------- oracle


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llava(request):
    model = build_tiny("llava", attn_implementation=request.param)
    inputs = make_inputs("llava", [PROMPT])
    return model, inputs


def _oracle(model, inputs, stages):
    return oracle_generate(
        model, inputs["input_ids"], inputs["pixel_values"], stages, STEPS, attention_mask=inputs["attention_mask"]
    )


def test_oracle_embeddings_match_model(llava):
    model, inputs = llava
    with torch.no_grad():
        first_layer_input = model.model(**inputs, output_hidden_states=True).hidden_states[0]
        embeds = oracle_inputs_embeds(model, inputs["input_ids"], inputs["pixel_values"])
    torch.testing.assert_close(embeds, first_layer_input, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_oracle_keep_all_matches_generate(llava, layer, policy):
    model, inputs = llava
    seq_len = inputs["input_ids"].shape[1]
    stages = [(layer, list(range(seq_len)), policy)]
    _assert_matches(_oracle(model, inputs, stages), _generate(model, inputs))


def test_oracle_without_stages_and_with_two_keep_all_stages(llava):
    model, inputs = llava
    everything = torch.arange(inputs["input_ids"].shape[1])
    reference = _generate(model, inputs)
    _assert_matches(_oracle(model, inputs, []), reference)
    _assert_matches(_oracle(model, inputs, [(1, everything, "renumber"), (3, everything, "keep")]), reference)


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_oracle_pruning_at_layer_0_matches_generate_on_gathered_embeddings(llava, policy):
    """Dropping tokens before layer 0 equals running the model on the surviving embeddings, with
    their original positions ("keep") or default contiguous positions ("renumber")."""
    model, inputs = llava
    input_ids = inputs["input_ids"]
    visual = (input_ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
    keep[visual[::2]] = False
    kept = keep.nonzero().flatten()  # [n']
    with torch.no_grad():
        embeds = oracle_inputs_embeds(model, input_ids, inputs["pixel_values"])[:, kept]
    position_ids = {"position_ids": kept[None]} if policy == "keep" else {}
    embeds_inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(1, kept.numel(), dtype=torch.long)}
    reference = _generate(model, embeds_inputs, **position_ids)
    pruned = _oracle(model, inputs, [(0, kept, policy)])
    _assert_matches(pruned, reference)
    assert pruned[0] != _oracle(model, inputs, [])[0]  # pruning changed the output


def test_oracle_policies_differ_once_tokens_are_removed(llava):
    model, inputs = llava
    seq_len = inputs["input_ids"].shape[1]
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    kept = [i for i in range(seq_len) if i not in visual[:8]]
    _, keep_logits = _oracle(model, inputs, [(2, kept, "keep")])
    _, renumber_logits = _oracle(model, inputs, [(2, kept, "renumber")])
    assert not torch.allclose(keep_logits, renumber_logits)


def test_oracle_rejects_bad_stages(llava):
    model, inputs = llava
    seq_len = inputs["input_ids"].shape[1]
    everything = list(range(seq_len))
    with pytest.raises(ValueError):
        _oracle(model, inputs, [(2, everything, "keep"), (1, everything, "keep")])  # not increasing
    with pytest.raises(ValueError):
        _oracle(model, inputs, [(1, everything[:-1], "keep")])  # drops the last position
    with pytest.raises(ValueError):
        _oracle(model, inputs, [(1, everything[1:], "keep"), (2, everything, "keep")])  # not a subset
    with pytest.raises(ValueError):
        _oracle(model, inputs, [(1, everything, "shift")])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_oracle_keep_all_matches_generate_llava_next(attn):
    model = build_tiny("llava_next", attn_implementation=attn)
    inputs = make_inputs("llava_next", [PROMPT])
    everything = list(range(inputs["input_ids"].shape[1]))
    reference = _generate(model, inputs)
    for stages in ([], [(2, everything, "renumber")]):
        oracle = oracle_generate(
            model, inputs["input_ids"], inputs["pixel_values"], stages, STEPS, image_sizes=inputs["image_sizes"]
        )
        _assert_matches(oracle, reference)
