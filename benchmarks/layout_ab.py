"""Interleaved A/B of layer-loop and attention-layout variants of the vmapped group round.

Variants (BERT-family attention swapped in for the run; the library's own class is "einsum"):
  einsum   scores ``einsum("bqhd,bkhd->bhqk")`` on the projection's [B, T, heads, d] layout
  heads    heads-first: q, k, v transposed once to [B, heads, T, d]
  dpa      ``jax.nn.dot_product_attention`` (XLA implementation on CPU)
each with the layer ``lax.scan`` (unroll 1) or fully unrolled. All variants are compiled
first, then timed round-robin (best and median of ``-n``), so machine load hits them alike.

    python benchmarks/layout_ab.py --model minilm-l6 -M 4 -B 16 -T 64 -E 2 -n 3 \\
        --variants einsum/scan,einsum/unroll,heads/unroll,dpa/unroll
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.round_speed import MODELS, Work, _inputs, build_model  # noqa: E402
from hfl_jax.fed.engine import make_group_round  # noqa: E402
from hfl_jax.fed.local import base_of  # noqa: E402
from hfl_jax.models import encoder  # noqa: E402
from hfl_jax.models.layers import LoRADense, SelfAttention, dense_init, split_heads  # noqa: E402


class HeadsFirstAttention(nn.Module):
    cfg: object
    compute_dtype: object = None

    @nn.compact
    def __call__(self, h, ctx, lora, scale):
        cfg = self.cfg
        proj = lambda name: LoRADense(cfg.hidden_size, dense_init(cfg), compute_dtype=self.compute_dtype,
                                      name=name)(h, lora.get(name), scale)
        q, k, v = (split_heads(proj(n), cfg.num_heads).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.asarray(cfg.head_dim, h.dtype))
        probs = jax.nn.softmax(scores + ctx["mask_bias"], axis=-1)
        out = jnp.einsum("bhqk,bhkd->bqhd", probs, v)
        return out.reshape(*out.shape[:2], cfg.hidden_size)


class DotProductAttention(nn.Module):
    cfg: object
    compute_dtype: object = None

    @nn.compact
    def __call__(self, h, ctx, lora, scale):
        cfg = self.cfg
        proj = lambda name: LoRADense(cfg.hidden_size, dense_init(cfg), compute_dtype=self.compute_dtype,
                                      name=name)(h, lora.get(name), scale)
        q, k, v = (split_heads(proj(n), cfg.num_heads) for n in ("query", "key", "value"))
        out = jax.nn.dot_product_attention(q, k, v, bias=ctx["mask_bias"])
        return out.reshape(*out.shape[:2], cfg.hidden_size)


ATTENTION = {"einsum": SelfAttention, "heads": HeadsFirstAttention, "dpa": DotProductAttention}


def with_attention(name: str):
    fam = encoder.FAMILIES["bert"]
    return dataclasses.replace(fam, attention=ATTENTION[name])


def compile_variant(setup, w, variant):
    attn, loop = variant.split("/")
    model = dataclasses.replace(setup.model, unroll=True if loop == "unroll" else 1)
    saved = encoder.FAMILIES["bert"]
    encoder.FAMILIES["bert"] = with_attention(attn)
    try:
        data, trainable, ids, weights, key = _inputs(dataclasses.replace(setup, model=model), w, 0)
        fn = make_group_round.__wrapped__(model, optax.adam(w.lr), depth=w.d, local_steps=w.E,
                                          batch_size=w.B, n_max=data.n_max)
        args = jax.device_put((trainable, base_of(setup.params), data, ids, weights, key))
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        return compiled, args, time.perf_counter() - t0
    finally:
        encoder.FAMILIES["bert"] = saved


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="minilm-l6")
    p.add_argument("-M", type=int, default=4)
    p.add_argument("-B", type=int, default=16)
    p.add_argument("-T", type=int, default=64)
    p.add_argument("-E", type=int, default=2)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--variants", default="einsum/scan,einsum/unroll,heads/unroll,dpa/unroll")
    p.add_argument("--check", action="store_true", help="only check that every variant matches einsum/scan")
    a = p.parse_args()
    setup = build_model(a.model)
    d = setup.model.num_layers
    w = Work(a.M, a.B, a.T, a.E, d, 8, 16.0, 1e-3)
    variants = a.variants.split(",")
    print(f"# {a.model} M={a.M} B={a.B} T={a.T} E={a.E} d={d}; load avg at start {os.getloadavg()[0]:.2f}")
    built = {v: compile_variant(setup, w, v) for v in variants}
    ref = jax.block_until_ready(built[variants[0]][0](*built[variants[0]][1]))
    for v, (c, args, cs) in built.items():
        out = jax.block_until_ready(c(*args))   # warm-up and equivalence check
        err = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                  for x, y in zip(jax.tree.leaves(out[0]), jax.tree.leaves(ref[0])))
        print(f"# {v}: compile {cs:.2f} s, max |diff| vs {variants[0]} = {err:.2e}")
    if a.check:
        return
    times = {v: [] for v in variants}
    for _ in range(a.n):
        for v, (c, args, _) in built.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[v].append(time.perf_counter() - t0)
    base = min(times[variants[0]])
    print(f"| variant | best s | median s | best vs {variants[0]} |\n|---|---|---|---|")
    for v, t in times.items():
        print(f"| {v} | {min(t):.3f} | {statistics.median(t):.3f} | {min(t) / base:.2f} |")
    print(f"# load avg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
