"""Interleaved A/B of the vmapped group round against the eager ``torch.func.vmap`` peer.

On a shared machine a load spike during one method's timing decides ``round_speed.py``'s ratio;
here both methods are built once and then timed alternately (jax, torch, jax, torch, ...), so every
pair sees about the same machine. Prints each pair's ratio, the median ratio and the matmul peak
measured before and after.

    python benchmarks/vmap_vs_torch_ab.py -M 8 -B 2      # MiniLM, T=64, E=2, full depth
    python benchmarks/vmap_vs_torch_ab.py -M 4 -B 16 --pairs 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import optax  # noqa: E402

import round_speed as rs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-M", type=int, default=8)
    ap.add_argument("-B", type=int, default=2)
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("-E", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--attention", default="auto", choices=("auto", "xla", "einsum"))
    ap.add_argument("--flat-opt", action="store_true", help="optax.flatten the optimizer (one update kernel)")
    ap.add_argument("--profile", metavar="DIR", help="after the pairs, profile 2 calls of each (jax.profiler, "
                    "torch.profiler) and print where each spends its time, by operation kind")
    args = ap.parse_args(argv)

    peak0 = rs.measure_peak(1024, 3)
    setup = rs.build_model("minilm-l6", unroll=True)
    import dataclasses
    setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, attention=args.attention))
    L = setup.model.num_layers
    w = rs.Work(M=args.M, B=args.B, T=args.T, E=args.E, d=L, rank=8, alpha=16.0, lr=1e-3)
    data, trainable, ids, weights, key = rs._inputs(setup, w, 0)
    opt = optax.flatten(optax.adam(w.lr)) if args.flat_opt else optax.adam(w.lr)
    fn = rs.make_group_round(setup.model, opt, depth=L, local_steps=w.E, batch_size=w.B,
                             n_max=data.n_max)
    jargs = jax.device_put((trainable, rs.base_of(setup.params), data, ids, weights, key))
    compiled = fn.lower(*jargs).compile()
    run_jax = lambda: jax.block_until_ready(compiled(*jargs))  # noqa: E731
    device, sync = rs._torch_device(os.cpu_count())
    _, one_round = rs.make_torch_vmap_round(setup, w, 0, device, "eager")
    run_torch = lambda: (one_round(), sync())  # noqa: E731
    for f in (run_jax, run_torch, run_jax, run_torch):   # warm-up
        f()
    pairs = []
    for _ in range(args.pairs):
        t0 = time.perf_counter()
        run_jax()
        t1 = time.perf_counter()
        run_torch()
        t2 = time.perf_counter()
        pairs.append((t1 - t0, t2 - t1))
        print(f"jax {t1 - t0:.3f} s  torch-vmap eager {t2 - t1:.3f} s  speed of vmap {(t2 - t1) / (t1 - t0):.2f}x",
              flush=True)
    if args.profile:
        profile(args.profile, run_jax, run_torch)
    peak1 = rs.measure_peak(1024, 3)
    ratios = [t / j for j, t in pairs]
    print(f"M={w.M} B={w.B} T={w.T} E={w.E} d={L} attention={args.attention}: median speed of vmap over eager "
          f"torch.func.vmap {statistics.median(ratios):.2f}x (pairs {len(pairs)}; jax median "
          f"{statistics.median(j for j, _ in pairs):.3f} s, torch median {statistics.median(t for _, t in pairs):.3f} s); "
          f"matmul peak {peak0 / 1e9:.0f} / {peak1 / 1e9:.0f} GFLOP/s before/after; load {os.getloadavg()[0]:.2f}")
    return 0


def _kind(name: str) -> str:
    """An XLA thunk's name without its instance number (``loop_add_fusion.12`` -> ``loop_add_fusion``)."""
    import re
    return re.sub(r"(\.\d+)+$", "", name)


def profile(out: str, run_jax, run_torch, calls: int = 2, top: int = 14) -> None:
    """Where each side's time goes, per call, by operation kind: XLA's thunks (jax.profiler trace of
    ``calls`` calls) and PyTorch's operators (torch.profiler, self CPU time)."""
    import collections

    import torch

    by = collections.Counter()
    for name, ms in rs.profile_thunks(run_jax, out, calls).items():
        if not name.startswith("$") and "PjRt" not in name and "Pjit" not in name:
            by[_kind(name)] += ms
    print(f"jax: ms per call by XLA thunk kind (top {top}; thunks may nest or run on two threads)")
    for k, ms in by.most_common(top):
        print(f"  {ms:9.1f}  {k}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run_torch()
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)[:top]
    print(f"torch: ms per call by operator, self CPU time (top {top})")
    for r in rows:
        print(f"  {r.self_cpu_time_total / 1e3 / calls:9.1f}  {r.key}")


if __name__ == "__main__":
    raise SystemExit(main())
