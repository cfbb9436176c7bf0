"""XLA memory of the paper-scale group round for each precision / rematerialisation / chunk policy.

Compiles (never runs) ``hfl_jax.fed.engine.make_group_round`` for a RoBERTa-base-shaped encoder
(random weights, built abstractly: nothing the size of the model is allocated) at the issue-14
setting: M=80 devices, B=8, T=128, E=2, rank 8 on query+value, full depth, Adam; and reads
``compiled.memory_analysis()``. XLA's buffer assignment is deterministic, so these numbers are
reproducible on any machine of the same backend; the default backend here is whatever jax finds
(CPU on a laptop: XLA:CPU's fusion and buffer choices differ from XLA:GPU's, so the absolute numbers
are indicative of a GPU's, the ratios between policies more so).

Columns: ``args`` (inputs: base, adapters, data), ``out``, ``temp`` (XLA's temporaries: activations,
residuals, optimizer state of all devices), ``alias`` (inputs reused for outputs), ``peak`` =
args + out + temp - alias, ``temp/device`` = temp / M.

    python benchmarks/memory_policies.py                       # the full matrix, JSON to stdout's path
    python benchmarks/memory_policies.py --model tiny -M 4 -B 2 -T 16 --only f32/none,bf16/full
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from hfl_jax.data import make_device_data  # noqa: E402

from hfl_jax.fed.device_axis import DeviceAxis  # noqa: E402
from hfl_jax.fed.engine import make_group_round  # noqa: E402
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora  # noqa: E402
from hfl_jax.models.precision import REMAT_POLICIES  # noqa: E402

MiB = 2.0 ** 20
GiB = 2.0 ** 30
SHAPES = {
    "roberta-base-shape": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                               layer_norm_eps=1e-5, pad_token_id=1, num_labels=2),
    "tiny": dict(model_type="bert", vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=128, num_labels=2),
}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def group_round_args(model: EncoderModel, M: int, B: int, T: int, E: int, rank: int):
    """Abstract arguments of the group round (``jax.ShapeDtypeStruct`` leaves; DeviceData's static fields kept)."""
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    lora = jax.eval_shape(lambda k: init_lora(k, model.cfg, LoRAConfig(rank, 2.0 * rank, ("query", "value"))),
                          jax.random.PRNGKey(1))
    n = M * E * B  # small host arrays: E * B rows of T tokens per device
    tok = {k: np.ones((n, T), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    data = make_device_data(dict(tok, labels=np.zeros(n, np.int32)), [np.arange(m * E * B, (m + 1) * E * B)
                                                                     for m in range(M)])
    trainable = {"lora": lora, "head": params["head"]}
    base = {k: v for k, v in params.items() if k != "head"}
    ids = jnp.arange(M, dtype=jnp.int32)
    weights = jnp.ones((M,), jnp.float32)
    return data, (trainable, base, abstract(data), abstract(ids), abstract(weights),
                  abstract(jax.random.PRNGKey(2)))


def measure(model: EncoderModel, M, B, T, E, rank, chunk, donate: bool) -> dict:
    data, args = group_round_args(model, M, B, T, E, rank)
    axis = DeviceAxis(chunk_size=chunk if chunk and chunk < M else None)
    group_round = make_group_round(model, optax.adam(1e-3), model.num_layers, E, B, data.n_max, axis)
    fn = group_round
    if donate:  # the trainable (broadcast adapters + head) donated to the aggregated output
        fn = jax.jit(lambda *a: group_round(*a), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    m = compiled.memory_analysis()
    row = {"compile_s": round(time.perf_counter() - t0, 1)}
    for k in ("argument", "output", "temp", "alias"):
        row[k] = int(getattr(m, f"{k}_size_in_bytes"))
    row["peak"] = row["argument"] + row["output"] + row["temp"] - row["alias"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(SHAPES), default="roberta-base-shape")
    p.add_argument("-M", type=int, default=80)
    p.add_argument("-B", type=int, default=8)
    p.add_argument("-T", type=int, default=128)
    p.add_argument("-E", type=int, default=2)
    p.add_argument("-r", "--rank", type=int, default=8)
    p.add_argument("--only", default=None,
                   help="comma-separated configs dtype/remat[/chunk][/donate], e.g. f32/none,bf16/full/40 "
                        "(default: f32 and bf16 x every remat policy, chunks 40 and 20, donation; most telling first)")
    p.add_argument("--unroll", type=int, default=0,
                   help="EncoderModel.unroll of the layer scan (0: all layers, as the driver does for L <= 12)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here (rewritten after each row)")
    args = p.parse_args(argv)
    cfg = EncoderConfig(**SHAPES[args.model])
    if args.only:
        configs = [c.split("/") for c in args.only.split(",") if c]
    else:
        configs = [["f32", "none"], ["bf16", "none"]] + [["bf16", r] for r in REMAT_POLICIES if r != "none"]
        configs += [["bf16", "full", "40"], ["f32", "full"], ["f32", "none", "", "donate"], ["f32", "dots"],
                    ["f32", "dense"], ["bf16", "full", "20"]]
    print(f"# memory_policies {datetime.datetime.now().isoformat(timespec='seconds')}: {args.model} M={args.M} "
          f"B={args.B} T={args.T} E={args.E} rank {args.rank} on query+value, full depth, Adam, layer scan unroll "
          f"{args.unroll or 'all'}; jax {jax.__version__} "
          f"backend {jax.default_backend()} {[str(d) for d in jax.devices()][:1]}")
    print("| dtype | remat | chunk | donate | compile s | args MiB | out MiB | temp MiB | alias MiB | peak GiB "
          "| temp MiB / device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for c in configs:
        dtype, remat = c[0], c[1]
        chunk = int(c[2]) if len(c) > 2 and c[2] else None
        donate = len(c) > 3 and c[3] == "donate"
        model = EncoderModel(cfg, compute_dtype=jnp.bfloat16 if dtype == "bf16" else None,
                             unroll=args.unroll or True, remat=remat)
        row = {"dtype": dtype, "remat": remat, "chunk": chunk, "donate": donate,
               **measure(model, args.M, args.B, args.T, args.E, args.rank, chunk, donate)}
        rows.append(row)
        print(f"| {dtype} | {remat} | {chunk or '-'} | {'yes' if donate else '-'} | {row['compile_s']} "
              f"| {row['argument'] / MiB:,.0f} | {row['output'] / MiB:,.1f} | {row['temp'] / MiB:,.0f} "
              f"| {row['alias'] / MiB:,.1f} | {row['peak'] / GiB:.2f} | {row['temp'] / MiB / args.M:,.1f} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "backend":
                                             jax.default_backend(), "jax": jax.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
