"""XLA's memory estimate of one decoder group round at paper scale (compiled, never run).

Compiles ``hfl_jax.fed.engine.make_group_round`` for a decoder of a hub checkpoint's shape
(``hfl_jax.models.DECODER_SHAPES``, all its layers unless ``--layers``) and reads
``compiled.memory_analysis()``. Everything is lowered from abstract shapes (``jax.eval_shape``,
``jax.ShapeDtypeStruct``, as tests/test_memory.py does): nothing the size of the model is
allocated, so a 1B model's round compiles on a laptop.

The settings come from the paper-scale configs ``experiments/configs/paper/<model>_gsm8k.yaml``
(read with ``hfl_jax.config.load_config``): ``M = partition.num_devices / algorithm.num_groups``
devices in the group, ``B = train.batch_size``, ``E = train.local_steps``, ``T = data.max_length``
(padded batches of the longest sequences a run keeps: the upper bound; a run trims each group to its
longest sequence and may pack rows, so its rounds are at most this), LoRA rank/alpha/targets from
``lora``, the devices' optimizer from ``train`` (``hfl_jax.driver.make_optimizer``), ``n_max`` = the
largest device of the config's partition of GSM8K's 7,473 training examples. Each model is measured
at full depth and at the arm grid's smallest depth (``algorithm.depths``; one program per depth, as
``train.depth_program: per_depth``), in float32 and bf16 (``compute_dtype=jnp.bfloat16``: the
frozen matmuls in bf16, float32 masters), vmapped over all M devices at once and chunked
(``DeviceAxis(chunk_size=train.chunk_size)``: ``lax.map`` over chunks inside the same call). The
layer loop stays rolled (``unroll=1``, as the driver does for more than 12 layers).

Columns: ``argument`` (base in float32, adapters, device data), ``output``, ``temp`` (activations
kept for the backward pass, logits, gradients and Adam moments of every device in flight), ``alias``,
``peak`` = argument + output + temp - alias (GiB), generated code (MiB), and the time model's rough
per-device estimate (``hfl_jax.fed.timemodel.memory_needed``, base included) for comparison.
XLA:CPU's buffer assignment differs from XLA:GPU's: these numbers are indicative of an accelerator's.

    python benchmarks/decoder_memory.py --layers 2                      # seconds: does it work?
    python benchmarks/decoder_memory.py --out benchmarks/results/decoder_memory_cpu.json   # all layers
    python benchmarks/decoder_memory.py --models llama-3.2-1b --dtypes bfloat16 --chunks 2,5 -T 256
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hfl_jax.config import load_config  # noqa: E402
from hfl_jax.data.partition import partition  # noqa: E402
from hfl_jax.driver import make_optimizer  # noqa: E402
from hfl_jax.fed import timemodel  # noqa: E402
from hfl_jax.fed.device_axis import DeviceAxis  # noqa: E402
from hfl_jax.fed.engine import make_group_round  # noqa: E402
from hfl_jax.models import DECODER_SHAPES, DecoderConfig, DecoderModel, LoRAConfig, init_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2.0 ** 30, 2.0 ** 20
# shape name -> its paper-scale config
CONFIGS = {"qwen2.5-0.5b": ROOT / "experiments/configs/paper/qwen2.5-0.5b_gsm8k.yaml",
           "llama-3.2-1b": ROOT / "experiments/configs/paper/llama-3.2-1b_gsm8k.yaml"}
GSM8K_TRAIN = 7473   # rows of ../shared/data/gsm8k/train.jsonl (what n_max is computed from)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One group round's shape: devices M, batch B, local steps E, sequence length T, rows per device n_max."""

    M: int
    B: int
    E: int
    T: int
    n_max: int
    rank: int
    alpha: float
    targets: tuple[str, ...]


def setting_of(cfg, args) -> Setting:
    """The group round of a paper config (``args`` overrides: -M, -B, -E, -T)."""
    p = cfg.partition
    parts = partition(np.zeros(GSM8K_TRAIN, np.int32), p.num_devices, p.method, cfg.seed,
                      **({"beta": p.beta, "min_samples": p.min_samples} if p.method == "quantity" else {}))
    return Setting(M=args.M or p.num_devices // cfg.algorithm.num_groups, B=args.B or cfg.train.batch_size,
                   E=args.E or cfg.train.local_steps, T=args.T or cfg.data.max_length,
                   n_max=max(len(x) for x in parts), rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                   targets=tuple(cfg.lora.targets))


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def group_round_args(model: DecoderModel, s: Setting):
    """Abstract ``(trainable, base, data, device_ids, weights, round_key)`` of a decoder group round."""
    from hfl_jax.data import DeviceData

    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    lora = jax.eval_shape(lambda k: init_lora(k, model.cfg, LoRAConfig(s.rank, s.alpha, s.targets)),
                          jax.random.PRNGKey(1))
    tok = jax.ShapeDtypeStruct((s.M, s.n_max, s.T), jnp.int32)
    data = DeviceData(input_ids=tok, attention_mask=tok, token_type_ids=tok, labels=tok,
                      valid=jax.ShapeDtypeStruct((s.M, s.n_max), jnp.bool_),
                      counts=jax.ShapeDtypeStruct((s.M,), jnp.int32))
    return ({"lora": lora}, params, data, jax.ShapeDtypeStruct((s.M,), jnp.int32),
            jax.ShapeDtypeStruct((s.M,), jnp.float32), abstract(jax.random.PRNGKey(2)))


def measure(model: DecoderModel, optimizer, s: Setting, depth: int, chunk: int | None) -> dict:
    """Compiles one group round and returns its memory analysis (bytes) and compile seconds."""
    args = group_round_args(model, s)
    axis = DeviceAxis(chunk_size=chunk if chunk and chunk < s.M else None)
    group_round = make_group_round(model, optimizer, depth=depth, local_steps=s.E, batch_size=s.B,
                                   n_max=s.n_max, axis=axis)
    t0 = time.perf_counter()
    m = group_round.lower(*args).compile().memory_analysis()
    row = {"compile_s": round(time.perf_counter() - t0, 1)}
    for k in ("argument", "output", "temp", "alias", "generated_code"):
        row[k] = int(getattr(m, f"{k}_size_in_bytes"))
    row["peak"] = row["argument"] + row["output"] + row["temp"] - row["alias"]
    row["base"] = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(args[1]))
    row["time_model_per_device"] = float(timemodel.memory_needed(model.cfg, s.B, s.T, depth, s.rank, s.targets))
    return row


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _chunk(x: str):
    return None if x in ("none", "0", "") else int(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", type=_csv(str), default=list(CONFIGS), help=f"comma-separated of {list(CONFIGS)}")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the number of layers (default: the checkpoint's, all of them); for a quick try")
    ap.add_argument("--dtypes", type=_csv(str), default=["float32", "bfloat16"], help="float32 and/or bfloat16")
    ap.add_argument("--depths", type=_csv(str), default=["full", "min"],
                    help="full (all layers) and/or min (the arm grid's smallest depth), or integers")
    ap.add_argument("--chunks", type=_csv(_chunk), default=None,
                    help="devices vmapped at once: none (all M) and the config's train.chunk_size (default), "
                         "or a comma-separated list, e.g. none,2,5")
    ap.add_argument("-M", type=int, default=None, help="override devices per group (default devices / groups)")
    ap.add_argument("-B", type=int, default=None, help="override the per-device batch (default train.batch_size)")
    ap.add_argument("-E", type=int, default=None, help="override the local steps (default train.local_steps)")
    ap.add_argument("-T", type=int, default=None, help="override the sequence length (default data.max_length)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the rows as JSON here (rewritten after each row), e.g. "
                         "benchmarks/results/decoder_memory_<date>.json")
    args = ap.parse_args(argv)
    unknown = set(args.models) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown --models {sorted(unknown)}; choose from {list(CONFIGS)}")

    print(f"# decoder_memory {datetime.datetime.now().isoformat(timespec='seconds')}: jax {jax.__version__}, "
          f"backend {jax.default_backend()} ({[str(d) for d in jax.devices()][:1]}), host {platform.node()}")
    header = ["model", "L", "M", "B", "E", "T", "dtype", "depth", "chunk", "compile s", "argument GiB", "output GiB",
              "temp GiB", "alias GiB", "peak GiB", "temp GiB / device", "code MiB", "time model GiB / device"]
    rows, settings = [], {}
    for name in args.models:
        cfg = load_config(CONFIGS[name])
        s = setting_of(cfg, args)
        hf = dict(DECODER_SHAPES[name], **({"num_hidden_layers": args.layers} if args.layers else {}))
        dcfg = DecoderConfig.from_hf(hf)
        L = dcfg.num_layers
        arm_min = min(d for d in (cfg.algorithm.depths or (1,)) if d <= L)
        depths = sorted({L if d == "full" else arm_min if d == "min" else int(d) for d in args.depths}, reverse=True)
        chunks = args.chunks if args.chunks is not None else [None, cfg.train.chunk_size]
        settings[name] = {"config": str(CONFIGS[name].relative_to(ROOT)), "model_name": cfg.model.name,
                          "layers": L, **dataclasses.asdict(s), "optimizer": cfg.train.optimizer, "lr": cfg.train.lr,
                          "num_devices": cfg.partition.num_devices, "num_groups": cfg.algorithm.num_groups}
        print(f"\n## {name} ({cfg.model.name} shape, random weights, {L} layers, H={dcfg.hidden_size}, "
              f"vocab {dcfg.vocab_size}) from {CONFIGS[name].relative_to(ROOT)}: {cfg.partition.num_devices} devices in "
              f"{cfg.algorithm.num_groups} groups -> M={s.M}; B={s.B} E={s.E} T={s.T} n_max={s.n_max}; rank {s.rank} "
              f"alpha {s.alpha:g} on {'+'.join(s.targets)}; {cfg.train.optimizer}; padded batches, no packing\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        opt = make_optimizer(cfg)
        for dtype in args.dtypes:
            model = DecoderModel(dcfg, compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else None, unroll=1)
            for depth in depths:
                for chunk in chunks:
                    row = {"model": name, "layers": L, "M": s.M, "B": s.B, "E": s.E, "T": s.T, "dtype": dtype,
                           "depth": depth, "chunk": chunk if chunk and chunk < s.M else None,
                           **measure(model, opt, s, depth, chunk)}
                    rows.append(row)
                    cells = [name, L, s.M, s.B, s.E, s.T, dtype, depth, row["chunk"] or "-", row["compile_s"],
                             f"{row['argument'] / GiB:.2f}", f"{row['output'] / GiB:.3f}", f"{row['temp'] / GiB:.2f}",
                             f"{row['alias'] / GiB:.3f}", f"**{row['peak'] / GiB:.2f}**",
                             f"{row['temp'] / GiB / s.M:.2f}", f"{row['generated_code'] / MiB:.1f}",
                             f"{row['time_model_per_device'] / GiB:.2f}"]
                    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
                    if args.out:
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps(
                            {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
                             "backend": jax.default_backend(), "host": platform.node(),
                             "command": " ".join(sys.argv), "settings": settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
