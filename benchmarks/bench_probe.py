"""Cost of the PIO gradient probe at LLaVA-1.5 width, on one random decoder layer.

Builds ONE random ``LlamaDecoderLayer`` (d=4096, intermediate 11008, 32 heads, sdpa) plus a
final RMSNorm and a vocab-32000 LM head, a 636-token sequence (35 text + 576 visual + 25 text,
like a POPE prompt) in float32, and times:

* ``plain``: the decoder layer's forward (no grad), what the model itself pays for one layer;
* ``exact``: the PIO probe through the model's own layer module (forward over all 636 positions,
  logit lens at the 4 loss positions, backward to the hidden states);
* ``fast``: the PIO probe with queries / ``o_proj`` / MLP / norm / LM head at the 4 loss
  positions only (keys and values at every position), forward + backward.

Both probes run through the real scorer code (``tokenreduce.strategies.pio.proxy_gradient``) on
a ``LlamaSignals`` over that single layer.  Prints median wall times, the ratio fast/plain and
the largest absolute difference between the fast and exact gradients.  No assertions.

Usage::

    PYTHONPATH=. python benchmarks/bench_probe.py [--threads 2] [--repeats 3] [--tokens 636]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from tokenreduce.adapters.llama_signals import LlamaSignals
from tokenreduce.core.types import TokenView
from tokenreduce.strategies.pio import proxy_gradient


def build(args):
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_hidden_layers=1,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.no_grad():
        layer = LlamaDecoderLayer(config, layer_idx=0).eval()
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).eval()
        lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).eval()
        for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)] + [lm_head]:
            lin.weight.normal_(0.0, 0.02)
        rotary = LlamaRotaryEmbedding(config)
        s = args.tokens
        hidden = torch.randn(1, s, config.hidden_size)
        position_ids = torch.arange(s).unsqueeze(0)
        cos_sin = rotary(hidden, position_ids)
    kwargs = {"attention_mask": None, "position_ids": position_ids, "position_embeddings": cos_sin}
    valid = torch.ones(1, s, dtype=torch.bool)
    v0, n = args.prefix, args.visual
    signals = LlamaSignals(
        layers=[layer],
        norm=norm,
        lm_head=lm_head,
        layer=0,
        current=(hidden, kwargs),
        previous=None,
        valid=valid,
        grid=lambda: torch.zeros(1, n, 3, dtype=torch.long),
    )
    view = TokenView(
        layer=0,
        stage=0,
        hidden=hidden,
        valid=valid,
        visual_index=torch.arange(v0, v0 + n).unsqueeze(0),
        visual_valid=torch.ones(1, n, dtype=torch.bool),
        original_index=torch.arange(v0, v0 + n).unsqueeze(0),
        n_original_visual=torch.tensor([n]),
        signals=signals,
    )
    return layer, kwargs, hidden, view


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=636)
    ap.add_argument("--prefix", type=int, default=35, help="text tokens before the image")
    ap.add_argument("--visual", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layer, kwargs, hidden, view = build(args)

    def plain():
        with torch.no_grad():
            return layer(hidden, use_cache=False, **kwargs)

    def probe(mode):
        return lambda: proxy_gradient(view, loss_positions=4, layer_offset=0, probe=mode)[0]

    t_plain, _ = timed(plain, args.repeats)
    t_exact, g_exact = timed(probe("exact"), args.repeats)
    t_fast, g_fast = timed(probe("fast"), args.repeats)
    leaked = sum(p.grad is not None for p in layer.parameters())
    print(
        f"d={args.hidden} m={args.intermediate} heads={args.heads} vocab={args.vocab} tokens={args.tokens} "
        f"fp32 cpu threads={args.threads} repeats={args.repeats} (median)"
    )
    print(f"plain layer forward (no grad)   {t_plain * 1e3:9.1f} ms")
    print(f"exact probe (forward+backward)  {t_exact * 1e3:9.1f} ms   exact/plain = {t_exact / t_plain:.2f}")
    print(f"fast probe  (forward+backward)  {t_fast * 1e3:9.1f} ms   fast/plain  = {t_fast / t_plain:.2f}")
    diff = (g_fast - g_exact).abs().max().item()
    scale = g_exact.abs().max().item()
    print(f"max |grad_fast - grad_exact| = {diff:.3e}  (max |grad_exact| = {scale:.3e})")
    print(f"parameters with .grad after the probes: {leaked}")


if __name__ == "__main__":
    main()
