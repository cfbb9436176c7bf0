"""The end-to-end peer of ``hfl-jax run`` for flat FedLoRA: a plain PyTorch + PEFT FedAvg loop.

The same experiment as ``hfl-jax run CONFIG`` with ``algorithm.name: fedlora``: the same training
subset and validation set (``hfl_jax.driver.load_data``: same seed, same tokenizer and max_length),
the same devices (``hfl_jax.driver.partition_devices``: identical index sets), the same pretrained
checkpoint, LoRA (rank, alpha, targets, no dropout) and trained parameters (LoRA + pooler +
classifier), E local steps of B examples per device and round with a fresh AdamW (lr, weight decay
and eps as ``hfl_jax.driver.make_optimizer``), FedAvg weighted by the devices' sample counts, and
an evaluation on the validation set every round. What a typical PyTorch loop does differently:
each batch is padded only to its own longest sequence (dynamic padding; the tokens are cut from
the max_length-padded arrays), devices run one after another, and the batches are drawn with
numpy (epoch-style, without replacement, like hfl_jax's sampler but from another random stream,
so trajectories agree in distribution, not number for number).
With ``model.compute_dtype: bfloat16`` in the config (or ``--set``) every forward and backward pass runs
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (training and evaluation; the loss in float32, the
parameters, gradients and AdamW state float32): the same-precision peer of hfl_jax's bf16 policy.

Writes ``metrics.jsonl`` (one record per round: ``round``, ``eval_loss``, ``eval_accuracy``,
``train_loss``, ``wall_time``) and ``summary.json`` (``wall_time`` = the whole command from the
first line of this file, ``final_accuracy``) to ``--out``.

    python benchmarks/e2e_peft.py experiments/configs/sst2_cpu/fedlora.yaml --out /tmp/peft \\
        --set partition.alpha=1.0
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def device_batches(rng: np.random.Generator, count: int, steps: int, batch: int) -> list[np.ndarray]:
    """``steps`` batches of row indices in ``[0, count)``: epochs of fresh permutations, walked in
    order and wrapped (a device with ``count < batch`` uses all its rows every step)."""
    per = min(count, batch)
    stream = np.concatenate([rng.permutation(count) for _ in range(-(-steps * per // count) + 1)])
    return [stream[e * per:(e + 1) * per] for e in range(steps)]


def to_torch(tok: dict, rows: np.ndarray, device) -> dict:
    """The rows' tokens cut to their longest sequence (dynamic padding), as int64 tensors."""
    import torch

    length = int(tok["attention_mask"][rows].sum(-1).max())
    out = {k: torch.from_numpy(tok[k][rows, :length].astype(np.int64)).to(device)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    return out, torch.from_numpy(tok["labels"][rows].astype(np.int64)).to(device)


def peft_model(cfg, num_labels: int, device):
    """transformers classifier from the packaged checkpoint + PEFT LoRA; trainable: LoRA, pooler, classifier."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from hfl_jax.models import resolve_model_dir

    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmodel = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(resolve_model_dir(cfg.model.name)), num_labels=num_labels)
    tmodel.eval()   # no dropout: hfl_jax trains without it
    tmodel.to(device)
    pmodel = get_peft_model(tmodel, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                               target_modules=list(cfg.lora.targets), lora_dropout=0.0))
    trainable = {}
    for name, p in pmodel.named_parameters():
        p.requires_grad_("lora_" in name or ".pooler." in name or ".classifier." in name)
        if p.requires_grad:
            trainable[name] = p
    return pmodel, trainable


def evaluate(pmodel, valid: dict, batch_size: int, device) -> tuple[float, float]:
    import torch

    n = len(valid["labels"])
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x, y = to_torch(valid, np.arange(lo, min(n, lo + batch_size)), device)
            logits = pmodel(**x).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    return loss_sum / n, correct / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as hfl-jax run --set")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    import torch

    from hfl_jax.config import load_config
    from hfl_jax.algos.stages import SALT_ROUNDS
    from hfl_jax.driver import load_data, partition_devices

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config(args.config, args.set)
    if cfg.algorithm.name != "fedlora" or cfg.train.participation < 1.0 or cfg.train.availability < 1.0:
        raise SystemExit("e2e_peft.py is the peer of flat FedLoRA with full participation")
    t = cfg.train
    train, valid, label_names = load_data(cfg)
    parts = partition_devices(cfg, train["labels"])
    pmodel, trainable = peft_model(cfg, len(label_names), device)
    bf16 = str(cfg.model.compute_dtype) == "bfloat16"
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    names, params = list(trainable), list(trainable.values())
    global_state = [p.detach().clone() for p in params]
    counts = np.array([len(p) for p in parts], np.float64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for r in range(1, t.rounds + 1):
        start = time.perf_counter()
        sums = [torch.zeros_like(p) for p in params]
        losses = []
        for d, rows in enumerate(parts):
            if len(rows) == 0:
                continue
            with torch.no_grad():
                for p, g in zip(params, global_state):
                    p.copy_(g)
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, eps=1e-8)
            rng = np.random.default_rng([cfg.seed, SALT_ROUNDS, r, d])
            for idx in device_batches(rng, len(rows), t.local_steps, t.batch_size):
                x, y = to_torch(train, rows[idx], device)
                with autocast():
                    logits = pmodel(**x).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
            with torch.no_grad():
                for s, p in zip(sums, params):
                    s.add_(p, alpha=float(counts[d] / counts.sum()))
        global_state = sums
        with torch.no_grad():
            for p, g in zip(params, global_state):
                p.copy_(g)
        with autocast():
            eval_loss, acc = evaluate(pmodel, valid, t.eval_batch_size, device)
        rec = {"round": r, "eval_loss": eval_loss, "eval_accuracy": acc, "train_loss": float(np.mean(losses)),
               "wall_time": time.perf_counter() - start}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    summary = {"name": cfg.name + "_peft_loop", "precision": "bf16 autocast" if bf16 else "float32", "rounds": len(records), "final_accuracy": records[-1]["eval_accuracy"],
               "rounds_wall_time": sum(x["wall_time"] for x in records),
               "wall_time": time.perf_counter() - STARTED, "trainable": len(names)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
