"""Per-operation profile of one compiled group round on this machine (issue 28, item 1).

    python benchmarks/profile_round.py --compute-dtype bfloat16 [--plain] [-M 8 -B 2 -T 64 -E 2]

Runs the round of ``round_speed.py`` (MiniLM-L6, full depth, LoRA on query/value, Adam) under
``jax.profiler.trace`` (a Perfetto trace; no TensorBoard needed), maps every XLA thunk back to its HLO
instruction and JAX ``op_name``, and prints the time per round by category (matrix products -- XLA:CPU's
``ynn_fusion``/``dot`` -- against everything else, forward against backward) and the top operations.
Times are summed over the thunks of the 2 threads, so they add up to more than the wall time; read
them as shares. ``--plain``: the frozen base as is (autodiff's backward products) instead of
:func:`hfl_jax.models.layers.prepare_base`'s transposed kernels.

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
import sys
import tempfile

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
    a = p.parse_args(argv)
    if a.torch:
        return profile_torch(a)
    setup, w = _setup(a)
    L = setup.model.num_layers
    data, trainable, ids, weights, key = rs._inputs(setup, w, 0)
    fn = make_group_round(setup.model, optax.adam(1e-3), depth=L, local_steps=a.E, batch_size=a.B, n_max=data.n_max)
    base = base_of(setup.params) if a.plain else prepare_base(setup.model, base_of(setup.params))
    args = jax.device_put((trainable, base, data, ids, weights, key))
    compiled = fn.lower(*args).compile()
    for _ in range(3):
        jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(a.rounds):
                jax.block_until_ready(compiled(*args))
        trace = json.load(gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    info = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            info[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "")
    by_cat, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in info:
            continue
        shape, kind, op = info[e["name"]]
        product = "ynn" in e["name"] or kind in ("dot", "custom-call")
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
    print(f"\n# top {a.top} operations (summed over layers and steps: count = thunks per round)")
    for k, t in by_op.most_common(a.top):
        print(f"{t / per:8.2f} ms {count[k] // a.rounds:4d}x  {k[1]:24s} {k[0][-90:]}")


TORCH_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def profile_torch(a) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(os.cpu_count())
    autocast = a.compute_dtype == "bfloat16"
    setup, w = _setup(a)
    _, one_round = rs.make_torch_vmap_round(setup, w, 0, torch.device("cpu"), "eager", None, autocast)
    for _ in range(3):
        one_round()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.rounds):
            one_round()
    per = 1e3 * a.rounds
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in rows)
    prod = sum(t for k, t, _ in rows if k in TORCH_PRODUCTS)
    print(f"# torch.func.vmap eager peer, {a.model} M={a.M} B={a.B} T={a.T} E={a.E} {a.compute_dtype}"
          f"{' (autocast)' if autocast else ''}; self time, ms per round")
    print(f"products  {prod / per:8.1f} ms  {100 * prod / total:5.1f}%")
    print(f"other     {(total - prod) / per:8.1f} ms  {100 * (total - prod) / total:5.1f}%")
    print(f"\n# top {a.top} operations (count = calls per round)")
    for k, t, c in sorted(rows, key=lambda r: -r[1])[:a.top]:
        print(f"{t / per:8.2f} ms {c // a.rounds:5d}x  {k}")


if __name__ == "__main__":
    main()
