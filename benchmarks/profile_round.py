"""Per-operation profile of one compiled group round on this machine (issue 28, item 1).

    python benchmarks/profile_round.py --compute-dtype bfloat16 [--plain] [-M 8 -B 2 -T 64 -E 2]

Runs the round of ``round_speed.py`` (MiniLM-L6, full depth, LoRA on query/value, Adam) under
``jax.profiler.trace`` (a Perfetto trace; no TensorBoard needed), maps every XLA thunk back to its HLO
instruction and JAX ``op_name``, and prints the time per round by category (matrix products -- XLA:CPU's
``ynn_fusion``/``dot`` -- against everything else, forward against backward) and the top operations.
Times are summed over the thunks of the 2 threads; XLA:CPU runs these thunks nearly one at a time
(a product spreads over both threads inside its thunk), so the sums come within a few percent of the
wall time, which the line "wall time per round" splits exactly (``wall_split``). ``--plain``: the
frozen base as is (autodiff's backward products) instead of :func:`hfl_jax.models.layers.prepare_base`'s
transposed kernels.

``--bound PAIRS``: both sides interleaved, each side's wall time split into products and the rest, and
the best hfl_jax round that keeping XLA's non-product work allows (products as fast as the peer's
oneDNN ones, or free) against the target ratio (:func:`bound`).

``--torch``: the same round of the eager ``torch.func.vmap`` peer (``round_speed.make_torch_vmap_round``,
under ``torch.autocast`` for bf16) under ``torch.profiler``: self time per aten operation, products
(the kernels ``mm``/``bmm``/``addmm``/``baddbmm``; ``matmul``/``linear`` only dispatch to them) against
everything else. Eager PyTorch runs one operation at
a time, so its self times add up to the round's wall time."""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import round_speed as rs  # noqa: E402
from hfl_jax.fed.engine import make_group_round  # noqa: E402
from hfl_jax.fed.local import base_of  # noqa: E402
from hfl_jax.models.layers import prepare_base  # noqa: E402


def _setup(a):
    """The model (its ``compute_dtype``) and the round's work of ``round_speed.py``: full depth, rank 8."""
    dtype = jnp.bfloat16 if a.compute_dtype == "bfloat16" else None
    setup = rs.build_model(a.model, compute_dtype=dtype, unroll=True)
    w = rs.Work(a.M, a.B, a.T, a.E, setup.model.num_layers, 8, 16.0, 1e-3, targets=rs.TARGETS)
    return setup, w


def _is_product(name: str, kind: str) -> bool:
    """XLA:CPU's matrix-product thunks: YNNPACK fusions, dots, and custom calls (oneDNN)."""
    return "ynn" in name or kind in ("dot", "custom-call")


CONTROL_FLOW = ("while", "conditional", "call")   # thunks that run other thunks: not counted twice


def _jax_round(a, setup, w):
    """The compiled hfl_jax group round of ``_setup``'s model and work, and its arguments, warmed up 3
    rounds; HLO instruction -> (shape, kind, JAX op_name) for mapping the trace's thunks back."""
    L = setup.model.num_layers
    data, trainable, ids, weights, key = rs._inputs(setup, w, 0)
    fn = make_group_round(setup.model, optax.adam(1e-3), depth=L, local_steps=a.E, batch_size=a.B, n_max=data.n_max)
    base = base_of(setup.params) if a.plain else prepare_base(setup.model, base_of(setup.params))
    args = jax.device_put((trainable, base, data, ids, weights, key))
    compiled = fn.lower(*args).compile()
    for _ in range(3):
        jax.block_until_ready(compiled(*args))
    info = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(", line)   # tuple shapes too
        if m and m.group(3) not in CONTROL_FLOW:
            op = re.search(r'op_name="([^"]+)"', line)
            info[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "")
    return compiled, args, info


def _jax_thunks(compiled, args, info, rounds: int) -> list[dict]:
    """The trace events of the XLA thunks of ``rounds`` profiled rounds."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(rounds):
                jax.block_until_ready(compiled(*args))
        trace = json.load(gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and e.get("name") in info]


def _union(intervals) -> float:
    """Total length covered by a set of [start, end) intervals."""
    total, end_ = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end_:
            total += e - max(s, end_)
            end_ = e
    return total


def wall_split(thunks: list[dict], info: dict) -> dict:
    """Wall time (us, all rounds) covered by product thunks, by the other thunks alone (no product thunk
    running on any thread), and by no thunk at all, from the thunks' trace intervals."""
    every = [(e["ts"], e["ts"] + e["dur"]) for e in thunks]
    prod = [(e["ts"], e["ts"] + e["dur"]) for e in thunks if _is_product(e["name"], info[e["name"]][1])]
    span = max(e for _, e in every) - min(s for s, _ in every)
    busy, products = _union(every), _union(prod)
    return {"span": span, "products": products, "other_only": busy - products, "idle": span - busy}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("-M", type=int, default=8)
    p.add_argument("-B", type=int, default=2)
    p.add_argument("-T", type=int, default=64)
    p.add_argument("-E", type=int, default=2)
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--plain", action="store_true", help="the unprepared base (autodiff's backward products)")
    p.add_argument("--rounds", type=int, default=3, help="profiled rounds (after 3 warm-up rounds)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--torch", action="store_true", help="profile the eager torch.func.vmap peer instead")
    p.add_argument("--bound", type=int, metavar="PAIRS", default=0,
                   help="PAIRS interleaved pairs of both sides' wall-time split and the best round XLA's "
                        "non-product work allows (see bound())")
    p.add_argument("--peer", choices=("vmap", "peft"), default="vmap",
                   help="the PyTorch side of --bound and --torch: eager torch.func.vmap, or the PEFT client loop")
    p.add_argument("--target", type=float, default=None,
                   help="--bound's target ratio peer / hfl_jax (default: 1.2 in bf16, 1.0 in float32)")
    a = p.parse_args(argv)
    if a.torch:
        return profile_torch(a)
    if a.bound:
        return bound(a)
    compiled, args, info = _jax_round(a, *_setup(a))
    thunks = _jax_thunks(compiled, args, info, a.rounds)
    by_cat, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in thunks:
        shape, kind, op = info[e["name"]]
        product = _is_product(e["name"], kind)
        phase = "backward" if "transpose(" in op else "forward"
        by_cat[("products" if product else "other", phase)] += e["dur"]
        short = re.sub(r"^jit\(group_round\)/vmap\(\)/while/body/", "", op).replace("closed_call/", "")
        key_ = (("product " if product else "") + (short or kind), shape)
        by_op[key_] += e["dur"]
        count[key_] += 1
    per = 1e3 * a.rounds
    print(f"# {a.model} M={a.M} B={a.B} T={a.T} E={a.E} {a.compute_dtype}{' plain base' if a.plain else ''}; "
          f"ms per round summed over threads")
    total = sum(by_cat.values())
    for k, t in by_cat.most_common():
        print(f"{k[0]:9s} {k[1]:9s} {t / per:8.1f} ms  {100 * t / total:5.1f}%")
    split = wall_split(thunks, info)
    print("# wall time per round: " + ", ".join(f"{k} {v / per:.1f} ms" for k, v in split.items()))
    print(f"\n# top {a.top} operations (summed over layers and steps: count = thunks per round)")
    for k, t in by_op.most_common(a.top):
        print(f"{t / per:8.2f} ms {count[k] // a.rounds:4d}x  {k[1]:24s} {k[0][-90:]}")


# the peer's product kernels. The PEFT loop's fused attention (``aten::_scaled_dot_product_flash_attention_for_cpu``
# and its backward: products and softmax in one kernel) counts as "other", so --bound's (a) treats hfl_jax's
# attention products as free there: optimistic for hfl_jax, which is the safe side for a bound
TORCH_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def _torch_round(a, setup, w):
    """One round of the eager ``torch.func.vmap`` peer, or with ``--peer peft`` the PyTorch + PEFT client loop
    (each under autocast for bf16), of ``_setup``'s model and work, warmed up 3 rounds."""
    import torch

    torch.set_num_threads(os.cpu_count())
    autocast = a.compute_dtype == "bfloat16"
    if a.peer == "peft":
        _, one_round = rs.make_torch_peft_round(setup, w, 0, torch.device("cpu"), autocast=autocast)
    else:
        _, one_round = rs.make_torch_vmap_round(setup, w, 0, torch.device("cpu"), "eager", None, autocast)
    for _ in range(3):
        one_round()
    return one_round


def _torch_rows(one_round, rounds: int) -> list[tuple[str, float, int]]:
    """(aten operation, self time in us, calls) over ``rounds`` profiled rounds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            one_round()
    return [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]


def profile_torch(a) -> None:
    rows = _torch_rows(_torch_round(a, *_setup(a)), a.rounds)
    per = 1e3 * a.rounds
    total = sum(t for _, t, _ in rows)
    prod = sum(t for k, t, _ in rows if k in TORCH_PRODUCTS)
    print(f"# {'PEFT loop' if a.peer == 'peft' else 'torch.func.vmap eager'} peer, {a.model} M={a.M} B={a.B} T={a.T} E={a.E} {a.compute_dtype}"
          f"{' (autocast)' if a.compute_dtype == 'bfloat16' else ''}; self time, ms per round")
    print(f"products  {prod / per:8.1f} ms  {100 * prod / total:5.1f}%")
    print(f"other     {(total - prod) / per:8.1f} ms  {100 * (total - prod) / total:5.1f}%")
    print(f"\n# top {a.top} operations (count = calls per round)")
    for k, t, c in sorted(rows, key=lambda r: -r[1])[:a.top]:
        print(f"{t / per:8.2f} ms {c // a.rounds:5d}x  {k}")


def _times(fn, calls: int) -> list[float]:
    """Wall seconds of each of ``calls`` calls of ``fn``."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _wall(fn, rounds: int) -> float:
    """Median wall seconds of ``rounds`` unprofiled calls of ``fn``."""
    return statistics.median(_times(fn, rounds))


def product_peak(bf16: bool, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n x n product, best of ``repeats``: bf16 x bf16 -> float32 (the round's
    bf16 products) or float32."""
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    call = lambda: jax.block_until_ready(f(x, x))  # noqa: E731
    call()
    return 2 * n ** 3 / min(_times(call, repeats))


def torch_product_peak(bf16: bool, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n ``torch.matmul`` (oneDNN/MKL on the CPU) in bf16 or float32, best of ``repeats``."""
    import torch

    x = torch.ones((n, n), dtype=torch.bfloat16 if bf16 else torch.float32)
    torch.matmul(x, x)
    return 2 * n ** 3 / min(_times(lambda: torch.matmul(x, x), repeats))


def bound(a) -> None:
    """How fast could the hfl_jax round be with products as fast as the peer's, or free?

    Each pair times both sides unprofiled (median of ``--rounds``), then profiles them: hfl_jax's wall
    time splits into time with a product thunk running, time with only other thunks running, and time
    with no thunk (from the thunks' trace intervals; XLA:CPU runs one thunk at a time here, each product
    using both threads); the peer's wall into its product kernels' self time and the rest. Both splits
    are taken as shares and scaled to the unprofiled wall. Keeping XLA's non-product work and its idle
    time, the best round is ``other + idle + peer products`` (products exactly as fast as oneDNN's, the
    most a ``jax.ffi`` kernel could give) and ``other + idle`` (products free); the target needs
    ``peer wall / target``. A floor on the products: the round's counted FLOPs (``round_speed.Work.flops``,
    the cost model's forward and backward products) at the best 2048^3 product either library reaches in
    the round's precision, measured before and after."""
    target = a.target or (1.2 if a.compute_dtype == "bfloat16" else 1.0)
    setup, w = _setup(a)   # one model for both sides
    compiled, args, info = _jax_round(a, setup, w)
    one_round = _torch_round(a, setup, w)
    flops = w.flops(setup.model.cfg)
    bf16 = a.compute_dtype == "bfloat16"
    peaks = [product_peak(bf16), torch_product_peak(bf16)]
    run_jax = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
    print(f"# {a.model} M={a.M} B={a.B} T={a.T} E={a.E} {a.compute_dtype}, peer {a.peer}; ms per round; {a.bound} interleaved "
          f"pairs; load {os.getloadavg()[0]:.2f}; float32 matmul peak {rs.measure_peak(2048, 5) / 1e9:.0f} GFLOP/s")
    rows = []
    for i in range(a.bound):
        jw = _wall(run_jax, a.rounds)
        split = wall_split(_jax_thunks(compiled, args, info, a.rounds), info)
        tw = _wall(one_round, a.rounds)
        trows = _torch_rows(one_round, a.rounds)
        total = sum(t for _, t, _ in trows)
        tprod = sum(t for k, t, _ in trows if k in TORCH_PRODUCTS) / total * tw
        jp, jo, ji = (split[k] / split["span"] * jw for k in ("products", "other_only", "idle"))
        r = {"jax_wall": jw, "jax_products": jp, "jax_other": jo, "jax_idle": ji, "torch_wall": tw,
             "torch_products": tprod, "torch_other": tw - tprod, "with_peer_products": jo + ji + tprod,
             "with_free_products": jo + ji, "budget": tw / target}
        rows.append(r)
        print(f"pair {i}: " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in r.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    lo = {k: min(r[k] for r in rows) for k in rows[0]}
    hi = {k: max(r[k] for r in rows) for k in rows[0]}
    print("# medians [min, max], ms per round")
    for k in med:
        print(f"{k:15s} {1e3 * med[k]:8.0f} [{1e3 * lo[k]:.0f}, {1e3 * hi[k]:.0f}]")
    ratio = lambda k: statistics.median(r["torch_wall"] / r[k] for r in rows)  # noqa: E731
    print(f"ratio peer / hfl_jax now {ratio('jax_wall'):.2f}x; with oneDNN-speed products at best "
          f"{ratio('with_peer_products'):.2f}x; with free products at best {ratio('with_free_products'):.2f}x; target {target}x")
    peaks += [product_peak(bf16), torch_product_peak(bf16)]
    at_peak = flops / max(peaks)
    print(f"products at the machine's best {'bf16' if bf16 else 'float32'} 2048^3 product "
          f"({max(peaks) / 1e9:.0f} GFLOP/s; XLA {peaks[0] / 1e9:.0f} -> {peaks[2] / 1e9:.0f}, PyTorch "
          f"{peaks[1] / 1e9:.0f} -> {peaks[3] / 1e9:.0f} before -> after; {flops / 1e9:.1f} GFLOP counted per round): "
          f"{1e3 * at_peak:.0f} ms; best round {1e3 * (med['with_free_products'] + at_peak):.0f} ms against the "
          f"budget {1e3 * med['budget']:.0f}: at best "
          f"{statistics.median(r['torch_wall'] / (r['with_free_products'] + at_peak) for r in rows):.2f}x")
    print(f"# end: load {os.getloadavg()[0]:.2f}; float32 matmul peak {rs.measure_peak(2048, 5) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
