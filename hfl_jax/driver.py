"""The one run loop: config -> setup -> rounds -> metrics, checkpoints, summary.

``run(cfg, out_dir)`` starts a run; ``resume(out_dir)`` continues one from its last
complete checkpoint. Library code elsewhere never prints; this module reports
progress through a callback (the CLI draws it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from hfl_jax import checkpoint as ckpt
from hfl_jax.algos import resolve
from hfl_jax.algos import grouping as grouping_lib
from hfl_jax.algos import hetlora as hetlora_lib
from hfl_jax.algos import rucb as rucb_lib
from hfl_jax.algos.round import (SALT_GROUPS, SALT_LORA_INIT, SALT_PARTITION, SALT_PROFILES, SALT_SUBSET,
                                RunState, Setup, bandit_of, run_round)
from hfl_jax.config import ExperimentConfig, load_config, to_dict
from hfl_jax.fed.device_axis import DeviceAxis, make_mesh
from hfl_jax.fed.engine import make_evaluate
from hfl_jax.fed.profiles import draw_profiles, load_profiles, profiles_to_arrays
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora, load_pretrained

log = logging.getLogger("hfl_jax")


def sub_seed(seed: int, salt: int) -> int:
    """An independent integer seed for one purpose (partition, profiles, groups, ...)."""
    return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0])


# --- setup -----------------------------------------------------------------------------------------

# Unroll the layer lax.scan up to this depth: no per-step zero-fill and dynamic slicing of the
# scan's stacked residuals, fusion across layers (benchmarks/RESULTS.md: 2-7% faster rounds on
# CPU for MiniLM-L6), at the price of compile time growing with L.
UNROLL_MAX_LAYERS = 12


def build_model(cfg: ExperimentConfig, num_labels: int):
    """(model, params) from ``cfg.model``: a checkpoint by name/path, or ``"tiny"`` (random BERT).

    The layer loop is unrolled for models of at most :data:`UNROLL_MAX_LAYERS` layers.
    """
    dtype = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
    if cfg.model.name == "tiny":
        t = cfg.model.tiny
        ecfg = EncoderConfig(model_type="bert", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                             num_layers=t.num_layers, num_heads=t.num_heads, intermediate_size=t.intermediate_size,
                             max_position_embeddings=max(512, cfg.data.max_length), num_labels=num_labels)
        model = EncoderModel(ecfg, compute_dtype=dtype)
        params = model.init(jax.random.PRNGKey(cfg.seed))
    else:
        import warnings

        from hfl_jax.models import FreshHeadWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FreshHeadWarning)  # a fresh head is the normal case here
            model, params = load_pretrained(cfg.model.name, num_labels=num_labels, seed=cfg.seed,
                                            compute_dtype=dtype)
    if model.num_layers <= UNROLL_MAX_LAYERS:
        model = dataclasses.replace(model, unroll=True)
    model = dataclasses.replace(model, attention=cfg.model.attention, remat=cfg.model.remat)
    return model, params


def load_data(cfg: ExperimentConfig):
    """Tokenized train and validation arrays (seeded subsets if configured) and the label names."""
    from hfl_jax.data import load_task, tokenize_dataset

    d = cfg.data
    tokenizer = d.tokenizer or ("minilm-l6" if cfg.model.name == "tiny" else cfg.model.name)
    out = []
    for split, subset in (("train", d.train_subset), ("validation", d.eval_subset)):
        ds = load_task(d.task, split, data_dir=d.data_dir, custom=d.custom)
        tok = tokenize_dataset(ds, tokenizer, d.max_length)
        if subset is not None and subset < len(tok["labels"]):
            idx = np.sort(np.random.default_rng([cfg.seed, SALT_SUBSET, 0 if split == "train" else 1]).choice(
                len(tok["labels"]), subset, replace=False))
            tok = {k: v[idx] for k, v in tok.items()}
        out.append(tok)
        label_names = ds.label_names
    return out[0], out[1], label_names


def partition_devices(cfg: ExperimentConfig, labels: np.ndarray) -> list[np.ndarray]:
    from hfl_jax.data import partition

    p = cfg.partition
    kw = {"dirichlet": {"alpha": p.alpha, "min_samples": p.min_samples},
          "pathological": {"classes_per_device": p.classes_per_device},
          "quantity": {"beta": p.beta}, "iid": {}}[p.method]
    return partition(labels, p.num_devices, p.method, sub_seed(cfg.seed, SALT_PARTITION), **kw)


def device_profiles(cfg: ExperimentConfig) -> dict:
    d = cfg.devices
    n = cfg.partition.num_devices
    profiles = load_profiles(d.profiles) if d.profiles else draw_profiles(
        n, tiers=d.tiers, seed=sub_seed(cfg.seed, SALT_PROFILES), bandwidth_jitter=d.bandwidth_jitter)
    if len(profiles) != n:
        raise ValueError(f"devices.profiles has {len(profiles)} profiles but partition.num_devices={n}")
    return profiles_to_arrays(profiles)


def group_assignment(cfg: ExperimentConfig, spec, label_counts: np.ndarray, speeds: np.ndarray) -> np.ndarray:
    if spec.grouping == "single":
        return np.zeros(len(label_counts), np.int64)
    if spec.grouping == "random":
        return grouping_lib.random_groups(len(label_counts), spec.num_groups, seed=sub_seed(cfg.seed, SALT_GROUPS))
    return grouping_lib.group_devices(label_counts, spec.num_groups, speeds=speeds, lam=cfg.algorithm.lam,
                                      seed=sub_seed(cfg.seed, SALT_GROUPS))


def _slots(assignment: np.ndarray, num_groups: int, axis: DeviceAxis) -> tuple:
    size = axis.padded_size(max(int((assignment == k).sum()) for k in range(num_groups)))
    out = []
    for k in range(num_groups):
        members = np.flatnonzero(assignment == k)
        out.append(np.concatenate([members, -np.ones(size - len(members), np.int64)]))
    return tuple(out)


def _group_data(data, slots: np.ndarray, prepare: Callable = lambda d: d):
    """A group's host DeviceData: one row per slot (padding slots empty), then ``prepare``d."""
    real = slots >= 0
    rows = jax.tree.map(lambda x: np.asarray(x)[np.where(real, slots, 0)], data)
    rows = rows.replace(counts=np.where(real, rows.counts, 0).astype(np.int32),
                        valid=rows.valid & real[:, None])
    return prepare(rows)


def _data_preparer(cfg: ExperimentConfig, model, base: dict, cached: int) -> Callable:
    """``prepare(host_data) -> host_data``: trims padding to a length bucket (``data.trim_padding``)
    and attaches the cached bottom-layer outputs (``train.cache_frozen_layers``)."""
    from hfl_jax.data import trim_padding
    from hfl_jax.fed.frozen_cache import attach_hidden

    d = cfg.data
    buckets = d.length_buckets if d.length_buckets is not None else d.length_multiple

    def prepare(data):
        if d.trim_padding:
            data = trim_padding(data, buckets)
        if cached:
            data = attach_hidden(data, model, base, cached, cfg.train.eval_batch_size)
        return data
    return prepare


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
    t = cfg.train
    if t.optimizer == "sgd":
        return optax.sgd(t.lr)
    if t.optimizer == "adam":
        return optax.adam(t.lr)
    return optax.adamw(t.lr, weight_decay=t.weight_decay)


@dataclasses.dataclass
class Experiment:
    """A built experiment: static setup, evaluation data, partition info and the initial state."""
    cfg: ExperimentConfig
    setup: Setup
    eval_data: Any
    parts: list
    label_counts: np.ndarray
    label_names: tuple
    train_labels: np.ndarray
    initial: RunState


def build(cfg: ExperimentConfig) -> Experiment:
    """Everything deterministic from the config: model, data, partition, profiles, groups, state 0."""
    from hfl_jax.data import eval_batches, make_device_data

    train, valid, label_names = load_data(cfg)
    model, params = build_model(cfg, len(label_names))
    parts = partition_devices(cfg, train["labels"])
    num_classes = len(label_names)
    label_counts = np.stack([np.bincount(train["labels"][p], minlength=num_classes) for p in parts])
    profiles = device_profiles(cfg)
    spec = resolve(cfg.algorithm, model.num_layers)
    for d in spec.depths:
        if not 1 <= d <= model.num_layers:
            raise ValueError(f"algorithm.depths: depth {d} is outside [1, {model.num_layers}]")
    assignment = group_assignment(cfg, spec, label_counts, profiles["flops"])
    mesh = make_mesh() if (cfg.train.shard and len(jax.devices()) > 1) else None
    axis = DeviceAxis(mesh, cfg.train.chunk_size)
    data = make_device_data(train, parts)
    slots = _slots(assignment, spec.num_groups, axis)
    if spec.selection == "fixed":
        depths, taus = np.array([spec.fixed_arm[0]]), np.array([spec.fixed_arm[1]])
    else:
        depths, taus = rucb_lib.make_arms(spec.depths, spec.taus)
    key = jax.random.PRNGKey(cfg.seed)
    base = {k: v for k, v in params.items() if k != "head"}
    cached = 0
    if cfg.train.cache_frozen_layers:
        from hfl_jax.fed.frozen_cache import cached_layers
        cached = cached_layers(depths, model.num_layers)
        if cached == 0:
            raise ValueError(f"train.cache_frozen_layers: algorithm {cfg.algorithm.name!r} has an arm of depth "
                             f"{model.num_layers} = every layer, so no layer is frozen for all arms; turn it off "
                             f"or use a depth grid below {model.num_layers}")
    prepare = _data_preparer(cfg, model, base, cached)
    setup = Setup(
        model=model, base=axis.replicate(base), assignment=assignment, group_slots=slots,
        group_data=tuple(axis.put(_group_data(data, s, prepare)) for s in slots), counts=np.asarray(data.counts),
        profiles=profiles, spec=spec, arm_depths=np.asarray(depths), arm_taus=np.asarray(taus),
        optimizer=make_optimizer(cfg), axis=axis, key=key, seed=cfg.seed, seq_len=cfg.data.max_length,
        n_max=data.n_max, local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size,
        rank=cfg.lora.rank, targets=tuple(cfg.lora.targets), participation=cfg.train.participation,
        availability=cfg.train.availability, bandit=cfg.algorithm.bandit, hetlora=cfg.algorithm.hetlora,
        edge_cloud_bandwidth=cfg.devices.edge_cloud_bandwidth)
    lora = init_lora(jax.random.fold_in(key, SALT_LORA_INIT), model.cfg,
                     LoRAConfig(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets)))
    if cached:
        from hfl_jax.fed.frozen_cache import check_untouched
        check_untouched(lora, cached)
    trainable = axis.replicate({"lora": lora, "head": params["head"]})
    if spec.aggregator == "hetlora":
        ranks = hetlora_lib.assign_ranks(profiles["flops"], cfg.algorithm.hetlora.ranks)
    else:
        ranks = np.full(len(parts), cfg.lora.rank, np.int32)
    bandit = bandit_of(setup)
    initial = RunState(round=0, trainable=trainable, bandits=tuple(bandit.init() for _ in slots),
                       reward_scale=np.zeros(len(slots)), ranks=ranks, sim_time=0.0, bytes_up=0.0, bytes_down=0.0)
    eval_data = axis.replicate(prepare(eval_batches(valid, cfg.train.eval_batch_size)))
    return Experiment(cfg, setup, eval_data, parts, label_counts, label_names, train["labels"], initial)


# --- state <-> checkpoint ----------------------------------------------------------------------------

def _meta(state: RunState, history: list, assignment: np.ndarray) -> dict:
    return ckpt.to_json({
        "round": state.round, "bandits": [b._asdict() for b in state.bandits],
        "reward_scale": state.reward_scale, "ranks": state.ranks, "sim_time": state.sim_time,
        "bytes_up": state.bytes_up, "bytes_down": state.bytes_down, "assignment": assignment,
        "history": history})


def _state_from(meta: dict, trainable: Any) -> RunState:
    bandits = tuple(rucb_lib.RUCBState(counts=np.asarray(b["counts"], np.float64),
                                       reward_sums=np.asarray(b["reward_sums"], np.float64),
                                       total=np.asarray(b["total"], np.float64),
                                       round=np.asarray(b["round"], np.int64)) for b in meta["bandits"])
    return RunState(round=int(meta["round"]), trainable=trainable, bandits=bandits,
                    reward_scale=np.asarray(meta["reward_scale"], np.float64),
                    ranks=np.asarray(meta["ranks"], np.int32), sim_time=float(meta["sim_time"]),
                    bytes_up=float(meta["bytes_up"]), bytes_down=float(meta["bytes_down"]))


# --- the loop --------------------------------------------------------------------------------------

def _fault_point(round_: int) -> None:
    """Fault injection for the resume tests: ``HFL_FAULT_KILL_ROUND=N`` SIGKILLs this process right
    after round N's metrics line is written and before its checkpoint (the harshest moment)."""
    if os.environ.get("HFL_FAULT_KILL_ROUND") == str(round_):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _write_jsonl(path: Path, records: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def stop_reason(history: list, state: RunState, t) -> str | None:
    """Why the run is over (``"target_accuracy"``, ``"time_budget"``, ``"rounds"``), or None."""
    if t.target_accuracy is not None and history and history[-1].get("eval_accuracy", -1) >= t.target_accuracy:
        return "target_accuracy"
    if t.time_budget is not None and state.sim_time >= t.time_budget:
        return "time_budget"
    if state.round >= t.rounds:
        return "rounds"
    return None


def is_main_process() -> bool:
    """Host files (metrics, summary, plots) are written by process 0 only; checkpoints by all (orbax)."""
    return jax.process_index() == 0


def train_loop(exp: Experiment, out_dir: Path, state: RunState, history: list,
               progress: Callable[[dict], None] | None = None) -> dict:
    """Runs rounds from ``state`` until a stop condition; writes metrics.jsonl, checkpoints, summary.json.

    The global model is evaluated every ``train.eval_every`` rounds and always at the last round.
    A resumed run that had already stopped does no further round.
    """
    cfg, setup = exp.cfg, exp.setup
    t = cfg.train
    main = is_main_process()
    evaluate = make_evaluate(setup.model)
    mgr = ckpt.manager(out_dir / "checkpoints", cfg.checkpoint.keep)
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        _write_jsonl(metrics_path, history)   # drop lines past the checkpoint we resumed from
    writer = _tensorboard(out_dir) if (cfg.tensorboard and main) else None
    while stop_reason(history, state, t) is None:
        start = time.perf_counter()
        state, record = run_round(setup, state)
        if state.round % t.eval_every == 0 or stop_reason(history, state, t) is not None:
            loss, acc = evaluate(state.trainable, setup.base, exp.eval_data)
            record["eval_loss"], record["eval_accuracy"] = float(loss), float(acc)
        record["wall_time"] = time.perf_counter() - start
        history.append(record)
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        _fault_point(state.round)
        if writer is not None:
            writer(record)
        done = stop_reason(history, state, t) is not None
        if state.round % cfg.checkpoint.every == 0 or done:
            ckpt.save(mgr, state.round, state.trainable, _meta(state, history, setup.assignment))
        if progress is not None:
            progress(record)
    summary = summarize(history, cfg)
    summary["stop_reason"] = stop_reason(history, state, t)
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(history: list, cfg: ExperimentConfig) -> dict:
    evals = [h for h in history if "eval_accuracy" in h]
    out = {"name": cfg.name, "algorithm": cfg.algorithm.name, "seed": cfg.seed, "rounds": len(history),
           "sim_time": history[-1]["sim_time"] if history else 0.0,
           "bytes_up": float(sum(h["bytes_up"] for h in history)),
           "bytes_down": float(sum(h["bytes_down"] for h in history)),
           "wall_time": float(sum(h.get("wall_time", 0.0) for h in history))}
    if evals:
        out["final_accuracy"] = evals[-1]["eval_accuracy"]
        out["best_accuracy"] = max(h["eval_accuracy"] for h in evals)
        out["final_loss"] = evals[-1]["eval_loss"]
    if cfg.train.target_accuracy is not None:
        hit = next((h for h in evals if h["eval_accuracy"] >= cfg.train.target_accuracy), None)
        out["target_accuracy"] = cfg.train.target_accuracy
        out["rounds_to_target"] = hit["round"] if hit else None
        out["time_to_target"] = hit["sim_time"] if hit else None
    return out


def _tensorboard(out_dir: Path):
    """A record -> TensorBoard scalars writer, if a writer library is installed (else None)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard: neither tensorboardX nor torch.utils.tensorboard is installed; skipped")
            return None
    w = SummaryWriter(str(out_dir / "tensorboard"))

    def write(rec):
        for k in ("eval_accuracy", "eval_loss", "sim_time", "round_time", "bytes_up", "bytes_down"):
            if k in rec:
                w.add_scalar(k, rec[k], rec["round"])
        w.flush()
    return write


def save_config(cfg: ExperimentConfig, out_dir: Path) -> None:
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run(cfg: ExperimentConfig, out_dir: str | Path, progress=None) -> dict:
    """Starts a run in ``out_dir`` (created; must not hold another run's checkpoints)."""
    out_dir = Path(out_dir)
    if (out_dir / "checkpoints").exists() and any((out_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"{out_dir} already holds a run; use `hfl-jax resume {out_dir}` or another --out")
    exp = build(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, out_dir)
        write_partition(exp, out_dir)
    summary = train_loop(exp, out_dir, exp.initial, [], progress)
    if is_main_process():
        write_plots(out_dir)
    return summary


def resume(out_dir: str | Path, progress=None) -> dict:
    """Continues the run in ``out_dir`` from its last complete checkpoint (bit-identical to an
    uninterrupted run, wall times aside)."""
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no config.yaml: not a hfl-jax run directory")
    cfg = load_config(cfg_path)
    exp = build(cfg)
    mgr = ckpt.manager(out_dir / "checkpoints", cfg.checkpoint.keep)
    if mgr.latest_step() is None:
        state, history = exp.initial, []
    else:
        _, trainable, meta = ckpt.restore(mgr, exp.initial.trainable)
        if not np.array_equal(np.asarray(meta["assignment"]), exp.setup.assignment):
            raise RuntimeError("the groups rebuilt from the config differ from the checkpoint's")
        state = _state_from(meta, exp.setup.axis.replicate(trainable))
        cached = exp.eval_data.hidden_layer
        if cached:
            from hfl_jax.fed.frozen_cache import check_untouched
            check_untouched(trainable["lora"], cached)
        history = meta["history"]
    summary = train_loop(exp, out_dir, state, history, progress)
    if is_main_process():
        write_plots(out_dir)
    return summary


def write_partition(exp: Experiment, out_dir: Path) -> dict:
    """partition.json (per-device sizes, label histograms, KL; per-group KL and sizes) and partition.png."""
    from hfl_jax.data import partition_report, plot_partition

    report = partition_report(exp.train_labels, exp.parts, len(exp.label_names))
    plot_partition(report, out_dir / "partition.png", class_names=list(exp.label_names))
    groups = grouping_lib.group_report(exp.label_counts, exp.setup.assignment, speeds=exp.setup.profiles["flops"])
    info = {"devices": report.to_dict(), "groups": ckpt.to_json(groups),
            "assignment": exp.setup.assignment.tolist()}
    (out_dir / "partition.json").write_text(json.dumps(ckpt.to_json(info), indent=1))
    return info


def write_plots(out_dir: Path) -> None:
    try:
        from hfl_jax.report import plot_runs
    except ImportError:
        return
    plot_runs([out_dir], out_dir)
