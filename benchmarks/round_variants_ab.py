"""Prototype variants of the vmapped group round, timed interleaved against each other and the eager
``torch.func.vmap`` peer in one process (issue 17, item 4). Not library code: the variants are patched
in here to measure what they would buy before anyone changes the model.

Variants (comma-separated, the first is the reference of the "vs" column and of the difference check):

  base     hfl_jax as it is: ``jax.nn.gelu(approximate=False)`` (``0.5 x erfc(-x/sqrt 2)``), separate
           query/key/value projections.
  cv       GELU as PyTorch computes it: ``x (1 + erf(x/sqrt 2)) / 2`` with a custom VJP
           ``g (Phi(x) + x phi(x))`` (one elementwise pass each way; XLA's erfc is a piecewise
           exp/rational approximation with selects, its erf one clamped rational polynomial).
  qkv      one ``[H, 3H]`` projection for query, key and value (their kernels concatenated; the LoRA
           ``A`` factors of the adapted ones concatenated too), split after the product.
  cv+qkv   both.

Both change float rounding (not the maths), so each variant's round result is compared with the
first variant's (max abs difference after the round's E Adam steps). ``--hlo-flops`` counts the
matrix-product FLOPs of the first variant's compiled round from its HLO (every dot and its shapes),
to check that XLA computes no product the model does not need; ``--dots-only`` times those products
alone, JAX against PyTorch.

    python benchmarks/round_variants_ab.py -M 4 -B 16 --variants base,cv,qkv,cv+qkv --pairs 7
    python benchmarks/round_variants_ab.py -M 8 -B 2 --variants base,cv+qkv --pairs 9 --hlo-flops
    python benchmarks/round_variants_ab.py -M 4 -B 16 --dots-only
    python benchmarks/round_variants_ab.py -M 4 -B 16 --variants base --pairs 3 --profile /tmp/trace
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import round_speed as rs  # noqa: E402
from hfl_jax.models import layers  # noqa: E402

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_erf(x):
    return x * (0.5 + 0.5 * lax.erf(x * SQRT_HALF))


def _gelu_fwd(x):
    return gelu_erf(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 + 0.5 * lax.erf(x * SQRT_HALF)
    return (g * (cdf + x * jnp.exp(-0.5 * x * x) * INV_SQRT_2PI),)


gelu_erf.defvjp(_gelu_fwd, _gelu_bwd)
GELU = {"base": layers._ACTIVATIONS["gelu"], "cv": gelu_erf}
ORIGINAL_ATTENTION = layers.SelfAttention.__call__


def fused_qkv_attention(self, h, ctx, lora, scale):
    """``SelfAttention`` (einsum path, float32) with one projection for query, key and value."""
    if self.is_initializing():
        return ORIGINAL_ATTENTION(self, h, ctx, lora, scale)
    cfg, params, names = self.cfg, self.variables["params"], ("query", "key", "value")
    kernel = jnp.concatenate([params[n]["kernel"] for n in names], 1)
    bias = jnp.concatenate([params[n]["bias"] for n in names])
    y = h @ kernel + bias
    width = cfg.hidden_size
    parts = [y[..., i * width:(i + 1) * width] for i in range(3)]
    adapted = [n for n in names if n in lora]
    if adapted:
        rank = lora[adapted[0]]["A"].shape[1]
        xa = h @ jnp.concatenate([lora[n]["A"] for n in adapted], 1)
        for j, n in enumerate(adapted):
            i = names.index(n)
            parts[i] = parts[i] + (xa[..., j * rank:(j + 1) * rank] @ lora[n]["B"]) * scale
    q, k, v = (layers.split_heads(p, cfg.num_heads) for p in parts)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.asarray(cfg.head_dim, jnp.float32))
    probs = jax.nn.softmax(scores + ctx["mask_bias"], axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(*out.shape[:2], cfg.hidden_size)


def hlo_dots(hlo: str) -> dict[str, tuple[float, tuple, tuple]]:
    """Every dot of a compiled module's text, keyed by the name of the thunk that runs it (its YNNPACK
    fusion, or the dot itself): (FLOPs = 2 x output size x contracted size, lhs shape, rhs shape)."""
    shapes: dict[str, list[int]] = {}
    dots, fusion_of, computation = {}, {}, None
    dim = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split()[0].lstrip("%")
        f = re.search(r"%(\S+) = \S+ fusion\(.*kind=kCustom, calls=%([^,\s]+)", line)
        if f:
            fusion_of[f.group(2)] = f.group(1)
        m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]", line)
        if m:
            shapes[m.group(1)] = dim(m.group(2))
        d = re.search(r"%(\S+) = f32\[([\d,]*)\]\S* dot\(%([^,\s]+), %([^,\s)]+)\).*?lhs_contracting_dims=\{([\d,]*)\}",
                      line)
        if d:
            out, lhs, rhs = dim(d.group(2)), shapes.get(d.group(3)), shapes.get(d.group(4))
            contracted = int(np.prod([lhs[i] for i in dim(d.group(5))]))
            dots[(computation, d.group(1))] = (2.0 * float(np.prod(out)) * contracted, tuple(lhs), tuple(rhs))
    return {fusion_of.get(c, name): v for (c, name), v in dots.items()}


def profile_round(run, dots: dict, out: str, local_steps: int, calls: int = 2, top: int = 12) -> None:
    """A ``jax.profiler`` trace of ``calls`` calls: milliseconds and GFLOP/s per call by dot shape, then
    the largest other thunk kinds (thunks overlap on the cores, so the parts add up to more than the call)."""
    ms = rs.profile_thunks(run, out, calls)
    by_shape = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, (flops, lhs, rhs) in dots.items():
        row = by_shape[(lhs, rhs)]
        row[0] += ms.get(name, 0.0)
        row[1] += flops
        row[2] += 1
    print(f"dots: ms per call by shape (the local-step loop's body runs {local_steps} times a call); all dots "
          f"{sum(r[0] for r in by_shape.values()):.0f} ms")
    for (lhs, rhs), (t, flops, n) in sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:top]:
        rate = flops * local_steps / t / 1e6 if t else 0.0   # a dot's FLOPs are per loop-body execution
        print(f"  {t:8.1f} ms  {n:3d} x {lhs} . {rhs}  {rate:4.0f} GFLOP/s")
    other = collections.Counter()
    for name, t in ms.items():
        if name not in dots and not name.startswith("$") and "Thunk" not in name and "Pjit" not in name:
            other[re.sub(r"(\.\d+)+$", "", name)] += t
    print(f"other thunks: ms per call by kind (top {top})")
    for kind, t in other.most_common(top):
        print(f"  {t:8.1f}  {kind}")


def dot_shapes(tokens: int, repeats: int = 20) -> None:
    """The round's projection and FFN products alone (warm inputs): ``x . W`` and the input gradient
    ``g . W^T`` at MiniLM's shapes, jitted JAX (with this process's XLA flags) vs PyTorch (its threads)."""
    import torch

    def median_time(f):
        return statistics.median(rs.time_it(f, repeats))

    rng = np.random.default_rng(0)
    total = {"jax": 0.0, "torch": 0.0}
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        x, w, g = (rng.random(s, np.float32) for s in ((tokens, k), (k, n), (tokens, n)))
        jx, jw, jg = map(jnp.asarray, (x, w, g))
        fwd, dx = jax.jit(lambda a, b: a @ b), jax.jit(lambda a, b: a @ b.T)
        tx, tw, tg = map(torch.from_numpy, (x, w, g))
        row = {"jax": (median_time(lambda: fwd(jx, jw).block_until_ready()),
                       median_time(lambda: dx(jg, jw).block_until_ready())),
               "torch": (median_time(lambda: tx @ tw), median_time(lambda: tg @ tw.T))}
        for side, (a, b) in row.items():
            total[side] += a + b
            print(f"  {side:5s} [{tokens}, {k}] . [{k}, {n}]: {a * 1e3:6.2f} ms ({2 * tokens * k * n / a / 1e9:.0f} "
                  f"GFLOP/s), input gradient {b * 1e3:6.2f} ms")
    print(f"dot shapes at {tokens} tokens: jax {total['jax'] * 1e3:.1f} ms, torch {total['torch'] * 1e3:.1f} ms "
          f"(torch threads {torch.get_num_threads()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-M", type=int, default=4)
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("-E", type=int, default=2)
    ap.add_argument("--variants", default="base,cv,qkv,cv+qkv")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--sleep", type=float, default=0.2, help="seconds of rest before each timed call")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--hlo-flops", action="store_true")
    ap.add_argument("--dots-only", action="store_true", help="only time the round's product shapes alone")
    ap.add_argument("--profile", metavar="DIR", help="after the timing, profile the first variant (jax.profiler "
                    "trace in DIR): time and GFLOP/s by dot shape, the largest other thunks")
    args = ap.parse_args(argv)
    if args.dots_only:
        peak0 = rs.measure_peak(1024, 3)
        dot_shapes(args.M * args.B * args.T)
        print(f"matmul peak {peak0 / 1e9:.0f} / {rs.measure_peak(1024, 3) / 1e9:.0f} GFLOP/s before/after; "
              f"load {os.getloadavg()[0]:.2f}")
        return 0
    variants = args.variants.split(",")

    peak0 = rs.measure_peak(1024, 3)
    setup = rs.build_model("minilm-l6", unroll=True)
    L = setup.model.num_layers
    w = rs.Work(M=args.M, B=args.B, T=args.T, E=args.E, d=L, rank=8, alpha=16.0, lr=1e-3)
    data, trainable, ids, weights, key = rs._inputs(setup, w, 0)
    jargs = jax.device_put((trainable, rs.base_of(setup.params), data, ids, weights, key))
    runs, first = {}, None
    for v in variants:
        layers._ACTIVATIONS["gelu"] = GELU["cv" if "cv" in v else "base"]
        layers.SelfAttention.__call__ = fused_qkv_attention if "qkv" in v else ORIGINAL_ATTENTION
        fn = rs.make_group_round(setup.model, optax.adam(w.lr), depth=L, local_steps=w.E, batch_size=w.B,
                                 n_max=data.n_max)
        compiled = fn.lower(*jargs).compile()
        runs[v] = lambda c=compiled: jax.block_until_ready(c(*jargs))
        out = runs[v]()
        if first is None:
            first = out
            dots = hlo_dots(compiled.as_text())
            first_run = runs[v]
            if args.hlo_flops:
                kinds = collections.Counter((lhs, rhs) for _, lhs, rhs in dots.values())
                print(f"{v}: dot FLOPs in the compiled round (the local-step loop's body counted once) "
                      f"{sum(f for f, _, _ in dots.values()) / 1e9:.2f} G in {len(dots)} dots; analytic "
                      f"step_flops x M {w.flops(setup.model.cfg) / w.E / 1e9:.2f} G")
                for (lhs, rhs), n in kinds.most_common(12):
                    print(f"   {n:3d} x {lhs} . {rhs}")
        diff = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda a, b: float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))),
            out, first)))
        print(f"{v}: max |difference| from {variants[0]} after the round: {diff:.2e}", flush=True)
    layers._ACTIVATIONS["gelu"], layers.SelfAttention.__call__ = GELU["base"], ORIGINAL_ATTENTION
    if not args.no_torch:
        device, sync = rs._torch_device(os.cpu_count())
        _, one_round = rs.make_torch_vmap_round(setup, w, 0, device, "eager")
        runs["torch"] = lambda: (one_round(), sync())
    for f in runs.values():   # warm-up
        f()
        f()
    times = {k: [] for k in runs}
    for _ in range(args.pairs):
        for k, f in runs.items():
            time.sleep(args.sleep)
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    if args.profile:
        profile_round(first_run, dots, args.profile, w.E)
    peak1 = rs.measure_peak(1024, 3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"M={w.M} B={w.B} {k:8s} median {med[k]:.3f} s  ({' '.join(f'{x:.2f}' for x in v)})  "
              f"speed vs {variants[0]} {med[variants[0]] / med[k]:.3f}x"
              + (f"  vs torch-vmap eager {med['torch'] / med[k]:.3f}x" if "torch" in med else ""))
    print(f"T={w.T} E={w.E} d={L}; rounds interleaved ({args.pairs} each, {args.sleep} s rest before each); matmul "
          f"peak {peak0 / 1e9:.0f} / {peak1 / 1e9:.0f} GFLOP/s before/after; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
