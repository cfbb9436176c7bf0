"""The one run loop: config -> setup -> rounds -> metrics, checkpoints, summary.

``run(cfg, out_dir)`` starts a run; ``resume(out_dir)`` continues one from its last
complete checkpoint. Library code elsewhere never prints; this module reports
progress through a callback (the CLI draws it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from hfl_jax import algos
from hfl_jax import checkpoint as ckpt
from hfl_jax import provenance
from hfl_jax.algos import AlgoState, FedAlgorithm
from hfl_jax.algos import grouping as grouping_lib
from hfl_jax.algos.stages import (SALT_GROUPS, SALT_LORA_INIT, SALT_PARTITION, SALT_PROBE_HOLDOUT, SALT_PROFILES,
                                  SALT_SUBSET, SALT_VALIDATION, round_key)
from hfl_jax.config import ExperimentConfig, check_group_signal, load_run_config, to_dict
from hfl_jax.fed.cost import Workload
from hfl_jax.fed.device_axis import DeviceAxis, make_mesh
from hfl_jax.fed.engine import make_evaluate
from hfl_jax.fed.env import Env
from hfl_jax.fed.local import base_of
from hfl_jax.fed.profiles import draw_profiles, load_profiles, profiles_to_arrays
from hfl_jax.files import write_atomic
from hfl_jax.report import record_totals
from hfl_jax.data.splits import training_rows  # noqa: F401  (re-exported)
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora, load_pretrained
from hfl_jax.models.layers import prepare_base
from hfl_jax.models.tiny import TINY_MODELS
from hfl_jax.objectives import Prepared, objective_for
from hfl_jax.objectives.classification import load_text, tokenize_text  # noqa: F401  (re-exported)

log = logging.getLogger("hfl_jax")


def sub_seed(seed: int, salt: int) -> int:
    """An independent integer seed for one purpose (partition, profiles, groups, ...)."""
    return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0])


# --- setup -----------------------------------------------------------------------------------------

# Unroll the layer lax.scan up to this depth: no per-step zero-fill and dynamic slicing of the
# scan's stacked residuals, fusion across layers (benchmarks/RESULTS.md: 2-7% faster rounds on
# CPU for MiniLM-L6, 16% on the study's group round), at the price of compile time growing with L.
UNROLL_MAX_LAYERS = 12
# On CPU a narrow encoder gains nothing from unrolling and compiles slower (RESULTS.md, issue 16
# item 3: the smoke encoder, hidden 32, depth 2: 4.85 s compile / 30 ms per round unrolled,
# 3.78 s / 26 ms rolled; MiniLM, hidden 384, depth 6: 3.88 s / 1.20 s unrolled, 2.77 s / 1.40 s rolled).
UNROLL_MIN_HIDDEN_CPU = 256


def auto_unroll(ecfg: EncoderConfig, backend: str) -> bool:
    """``model.unroll: auto``: unroll the layer loop of models of at most :data:`UNROLL_MAX_LAYERS`
    layers, on CPU only when they are at least :data:`UNROLL_MIN_HIDDEN_CPU` wide. (Accelerators:
    not yet measured, so the earlier rule, unroll up to 12 layers, stays.)"""
    if ecfg.num_layers > UNROLL_MAX_LAYERS:
        return False
    return backend != "cpu" or ecfg.hidden_size >= UNROLL_MIN_HIDDEN_CPU


def build_model(cfg: ExperimentConfig, num_labels: int = 2, vocab_size: int | None = None):
    """(model, params) from ``cfg.model``: a checkpoint by name/path, ``"tiny"`` (random BERT) or
    ``"tiny-decoder"`` (a random Llama-architecture decoder of ``model.tiny.*`` with ``vocab_size``
    tokens: the run's tokenizer's).

    The layer loop is unrolled as ``model.unroll`` says (``auto``: :func:`auto_unroll`).
    """
    dtype = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
    if cfg.model.name in TINY_MODELS:
        model = TINY_MODELS[cfg.model.name][0](cfg.model.tiny, max_length=cfg.data.max_length, num_labels=num_labels,
                                               vocab_size=vocab_size, compute_dtype=dtype)
        params = _compiled_init(model)(jax.random.PRNGKey(cfg.seed))
    else:
        import warnings

        from hfl_jax.models import FreshHeadWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FreshHeadWarning)  # a fresh head is the normal case here
            model, params = load_pretrained(cfg.model.name, num_labels=num_labels, seed=cfg.seed,
                                            compute_dtype=dtype)
    mode = cfg.model.unroll
    if mode == "always" or (mode == "auto" and auto_unroll(model.cfg, jax.default_backend())):
        model = dataclasses.replace(model, unroll=True)
    model = dataclasses.replace(model, attention=cfg.model.attention, remat=cfg.model.remat,
                                layer_policy=cfg.algorithm.layer_policy)
    return model, params


@functools.lru_cache(maxsize=16)
def _compiled_init(model):
    """``model.init`` as one compiled program, once per model in a process (op by op it compiled
    dozens of small programs: seconds on CPU); the same bits (``layers.dense_init``)."""
    return jax.jit(model.init)


def _model_and_adapters(cfg: ExperimentConfig, num_labels: int = 2, vocab_size: int | None = None) -> tuple:
    """``(model, params, lora)``: :func:`build_model` and the initial adapters (seeded by ``cfg.seed``)."""
    model, params = build_model(cfg, num_labels, vocab_size)
    lora = init_lora(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), SALT_LORA_INIT), model.cfg,
                     LoRAConfig(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets)))
    return model, params, lora


def load_data(cfg: ExperimentConfig):
    """Tokenized train and evaluation arrays and the label names of a classification run
    (:func:`hfl_jax.objectives.classification.load_text`, then ``tokenize_text``). Rows are chosen
    before tokenization, so only the rows a run uses are tokenized (and cached)."""
    train, evals = load_text(cfg)
    return (*tokenize_text(cfg, train, evals), train.label_names)


def partition_devices(cfg: ExperimentConfig, labels: np.ndarray) -> list[np.ndarray]:
    """The devices' example indices from the configured partitioner, which takes the
    ``partition.*`` parameters its signature names (alpha, min_samples, classes_per_device, beta)."""
    import inspect

    from hfl_jax.data import PARTITIONERS, partition

    p = cfg.partition
    params = inspect.signature(PARTITIONERS[p.method]).parameters
    kw = {k: v for k, v in dataclasses.asdict(p).items() if k in params and k not in ("num_devices", "seed")}
    return partition(labels, p.num_devices, p.method, sub_seed(cfg.seed, SALT_PARTITION), **kw)


def split_probe_holdout(parts: list, per_device: int, seed: int) -> tuple[list, list]:
    """``(training parts, probe parts)``: each device holds ``min(per_device, n_i // 4)`` of its
    ``n_i`` examples (drawn with ``seed``) out of training for the bandit's probe."""
    rng = np.random.default_rng([seed, SALT_PROBE_HOLDOUT])
    train, probe = [], []
    for p in parts:
        p = np.asarray(p)
        held = np.zeros(len(p), bool)
        held[rng.choice(len(p), min(per_device, len(p) // 4), replace=False)] = True
        train.append(p[~held])
        probe.append(p[held])
    return train, probe


def device_profiles(cfg: ExperimentConfig) -> dict:
    d = cfg.devices
    n = cfg.partition.num_devices
    profiles = load_profiles(d.profiles) if d.profiles else draw_profiles(
        n, tiers=d.tiers, seed=sub_seed(cfg.seed, SALT_PROFILES), bandwidth_jitter=d.bandwidth_jitter)
    if len(profiles) != n:
        raise ValueError(f"devices.profiles has {len(profiles)} profiles but partition.num_devices={n}")
    return profiles_to_arrays(profiles)


def _slots(assignment: np.ndarray, num_groups: int, axis: DeviceAxis, exact: bool = False) -> tuple:
    """Per group ``[S]`` device ids, ``-1`` on padding slots: every group padded to the largest
    group's size (one program per depth for all groups), or with ``exact`` each to its own (both
    rounded up for the device axis' sharding)."""
    members = [np.flatnonzero(assignment == k) for k in range(num_groups)]
    largest = max(len(m) for m in members)
    return tuple(np.concatenate([m, -np.ones(axis.padded_size(len(m) if exact else largest) - len(m), np.int64)])
                 for m in members)


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


def _packing(cfg: ExperimentConfig, model, cached: int, data, slots: tuple) -> dict:
    """The :class:`Env` fields of sequence packing (``data.pack``): the row length and each group's
    row lengths ``[S, n_max]``; none when off or when the model or cached layers cannot pack."""
    if not (cfg.data.pack and model.packs and not cached):
        return {}
    lengths = (np.asarray(data.attention_mask) > 0).sum(-1).astype(np.int32)
    per_group = tuple(np.where((s >= 0)[:, None], lengths[np.where(s >= 0, s, 0)], 0) for s in slots)
    return {"pack_row_len": cfg.data.pack_length or 2 * cfg.data.max_length, "group_lengths": per_group}


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
    """The devices' optimizer (``train.optimizer``), after clipping the gradient's global norm
    to ``train.clip_norm`` when set. The same settings give the same object within a process, so
    runs built one after another (a sweep's, a notebook's, the tests') share the compiled group
    rounds (``make_group_round`` is cached on the optimizer); optax transformations hold no state."""
    t = cfg.train
    return _optimizer(t.optimizer, float(t.lr), float(t.weight_decay), t.clip_norm)


@functools.lru_cache(maxsize=64)
def _optimizer(name: str, lr: float, weight_decay: float, clip_norm: float | None) -> optax.GradientTransformation:
    if name == "sgd":
        opt = optax.sgd(lr)
    elif name == "adam":
        opt = optax.adam(lr)
    else:
        opt = optax.adamw(lr, weight_decay=weight_decay)
    return opt if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), opt)


@dataclasses.dataclass
class Experiment:
    """A built experiment: the algorithm, its environment, evaluation data, partition info, state 0."""
    cfg: ExperimentConfig
    algorithm: FedAlgorithm
    env: Env
    eval_data: Any
    parts: list
    label_counts: np.ndarray
    label_names: tuple
    train_labels: np.ndarray      # [N] what partitions and groups see (classes, or categories)
    initial: AlgoState
    objective: Any = None         # the objective module (hfl_jax.objectives)
    prepared: Prepared | None = None


def evaluate_global(exp: Experiment, trainable) -> dict:
    """The global model's evaluation record: ``eval_loss``, ``eval_accuracy`` (the objective's main
    metric) and whatever else the objective reports (causal LM: perplexity, generation metrics)."""
    loss, acc = make_evaluate(exp.env.model)(trainable, exp.env.base, exp.eval_data)
    out = {"eval_loss": float(loss), "eval_accuracy": float(acc)}
    out.update(exp.objective.extra_metrics(exp.cfg, exp.prepared, exp.env.model, trainable, exp.env.base, out))
    return out


def workload(cfg: ExperimentConfig) -> Workload:
    """What each device does per round and the edge-cloud link, from the config."""
    t = cfg.train
    return Workload(local_steps=t.local_steps, batch_size=t.batch_size, seq_len=cfg.data.max_length,
                    rank=cfg.lora.rank, targets=tuple(cfg.lora.targets),
                    edge_cloud_bandwidth=cfg.devices.edge_cloud_bandwidth, edge_latency=cfg.devices.edge_latency,
                    cloud_latency=cfg.devices.cloud_latency, two_tier=cfg.devices.two_tier,
                    layer_policy=cfg.algorithm.layer_policy)


def grouping_inputs(cfg: ExperimentConfig, model, params, train: dict, parts) -> dict:
    """What the algorithm's ``group`` gets besides the label counts: with ``algorithm.grouping.signal:
    embedding`` each device's mean frozen-model embedding (:func:`hfl_jax.fed.signals.mean_embeddings`)."""
    if cfg.algorithm.grouping.signal != "embedding":
        return {}
    from hfl_jax.fed.signals import mean_embeddings
    return {"embeddings": mean_embeddings(model, base_of(params), train, parts, batch_size=cfg.train.eval_batch_size)}


def build(cfg: ExperimentConfig) -> Experiment:
    """Everything deterministic from the config: model, data, partition, profiles, groups, state 0."""
    from hfl_jax.data import make_device_data
    from hfl_jax.fed.xla import use_unrolled_threefry

    use_unrolled_threefry()   # random programs compile faster on CPU, same bits (hfl_jax.fed.xla)
    objective = objective_for(cfg.model.name)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the model's initialization (mostly XLA compilations, outside the GIL) runs while the
        # tokenizer loads and tokenizes (Python): seconds of start-up on a cold cache
        prepared = objective.prepare(cfg, lambda **kw: pool.submit(_model_and_adapters, cfg, **kw))
    model, params, lora = prepared.model
    train, label_names = prepared.train, prepared.class_names
    parts = partition_devices(cfg, prepared.classes)
    num_classes = len(label_names)
    label_counts = np.stack([np.bincount(prepared.classes[p], minlength=num_classes) for p in parts])
    profiles = device_profiles(cfg)
    algorithm = algos.build(cfg, model.num_layers)
    check_group_signal(cfg, algorithm)
    for d in algorithm.depths:
        if not 1 <= d <= model.num_layers:
            raise ValueError(f"algorithm.depths: depth {d} is outside [1, {model.num_layers}]")
    assignment = np.asarray(algorithm.group(label_counts, profiles["flops"], sub_seed(cfg.seed, SALT_GROUPS),
                                            **grouping_inputs(cfg, model, params, train, parts)))
    num_groups = int(assignment.max()) + 1
    mesh = make_mesh() if (cfg.train.shard and len(jax.devices()) > 1) else None
    axis = DeviceAxis(mesh, cfg.train.chunk_size)
    train_parts, probe_parts = parts, None
    if algorithm.probes and cfg.algorithm.bandit.probe_holdout:
        train_parts, probe_parts = split_probe_holdout(parts, cfg.algorithm.bandit.probe_holdout, cfg.seed)
    data = make_device_data(train, train_parts)
    slots = _slots(assignment, num_groups, axis, exact=cfg.train.group_padding == "exact")
    key = jax.random.PRNGKey(cfg.seed)
    base = prepare_base(model, base_of(params))   # bf16 on CPU: + transposed frozen kernels
    cached = 0
    if cfg.train.cache_frozen_layers:
        # the layers below every arm's lowest trained layer (top: L - max(depths)); none under bottom
        from hfl_jax.fed.frozen_cache import cached_layers
        cached = cached_layers(algorithm.depths, model.num_layers, model.layer_policy)
        if cached == 0:
            raise ValueError(f"train.cache_frozen_layers: algorithm {cfg.algorithm.name!r} has an arm that trains "
                             f"layer 0 (depth {model.num_layers} = every layer, or algorithm.layer_policy "
                             f"{model.layer_policy!r}), so no layer is frozen for all arms; turn it off "
                             f"or use a depth grid below {model.num_layers} with the top or spread policy")
    prepare = _data_preparer(cfg, model, base, cached)
    probe_data = make_device_data(train, probe_parts) if probe_parts is not None else None
    if cached:
        from hfl_jax.fed.frozen_cache import check_untouched
        check_untouched(lora, cached)
    env = Env(model=model, base=axis.replicate(base), initial=axis.replicate(
                  {"lora": lora, "head": params["head"]} if "head" in params else {"lora": lora}),
              assignment=assignment, group_slots=slots,
              group_data=tuple(axis.put(_group_data(data, s, prepare)) for s in slots),
              counts=np.asarray(data.counts), profiles=profiles, axis=axis, optimizer=make_optimizer(cfg),
              workload=workload(cfg), key=key, seed=cfg.seed, n_max=data.n_max,
              participation=cfg.train.participation, availability=cfg.train.availability,
              probe_data=None if probe_data is None else tuple(
                  axis.put(_group_data(probe_data, s, prepare)) for s in slots),
              probe_n_max=0 if probe_data is None else probe_data.n_max,
              probe_counts=None if probe_data is None else np.asarray(probe_data.counts),
              shared_depth=cfg.train.depth_program == "shared",
              **_packing(cfg, model, cached, data, slots))
    if env.pack_row_len and cfg.data.pack_rows == "run":
        from hfl_jax.algos.stages import run_pack_rows
        env = dataclasses.replace(env, pack_rows=run_pack_rows(env, cfg.train.rounds, algorithm.intra_rounds))
    initial = algorithm.init(env, key)
    eval_data = axis.replicate(objective.eval_data(cfg, prepared, model, prepare, env.pack_row_len))
    return Experiment(cfg, algorithm, env, eval_data, parts, label_counts, label_names, prepared.classes, initial,
                      objective, prepared)


# --- state <-> checkpoint ----------------------------------------------------------------------------

def _arrays(state: AlgoState) -> Any:
    """The state's accelerator arrays (orbax): the global model, plus the algorithm's device tree when it
    has one (then ``{"trainable", "device"}``; without one the layout of earlier versions, so their
    runs still resume)."""
    return state.trainable if state.device is None else {"trainable": state.trainable, "device": state.device}


def _meta(state: AlgoState, history: list, assignment: np.ndarray) -> dict:
    return ckpt.to_json({
        "round": state.round, "host": jax.tree.leaves(state.host), "sim_time": state.sim_time,
        "bytes_up": state.bytes_up, "bytes_down": state.bytes_down, "assignment": assignment,
        "history": history})


def _state_from(meta: dict, arrays: dict, like: AlgoState, axis: DeviceAxis) -> AlgoState:
    """The state saved as ``(arrays, meta)``; ``like`` (state 0) gives the host tree's structure and dtypes."""
    leaves, treedef = jax.tree.flatten(like.host)
    if "host" not in meta:
        raise RuntimeError("this checkpoint was written by hfl_jax before the algorithm API (bandit and rank "
                           "state stored per field); resume it with that version (git a78bbc7) or start anew")
    saved = meta["host"]
    if len(saved) != len(leaves):
        raise RuntimeError(f"the checkpoint's algorithm state has {len(saved)} values where "
                           f"{len(leaves)} are expected: was it written by another algorithm or version?")
    host = jax.tree.unflatten(treedef, [np.asarray(v, np.asarray(x).dtype).reshape(np.shape(x))
                                        for v, x in zip(saved, leaves)])
    trainable, device = (arrays, None) if like.device is None else (arrays["trainable"], arrays["device"])
    # orbax restores each array with state 0's sharding (``like``); placing them again through the
    # host would need a sharded array's every shard on this process, which it lacks with several
    placed = lambda tree, place: tree if all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)) \
        else place(tree)
    return AlgoState(round=int(meta["round"]), trainable=placed(trainable, axis.replicate),
                     sim_time=float(meta["sim_time"]), bytes_up=float(meta["bytes_up"]),
                     bytes_down=float(meta["bytes_down"]), host=host,
                     device=None if device is None else placed(device, axis.put))


# --- the loop --------------------------------------------------------------------------------------

def _fault_point(round_: int) -> None:
    """Fault injection for the resume tests: ``HFL_FAULT_KILL_ROUND=N`` SIGKILLs this process right
    after round N's metrics line is written and before its checkpoint (the harshest moment)."""
    if os.environ.get("HFL_FAULT_KILL_ROUND") == str(round_):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _write_jsonl(path: Path, records: list) -> None:
    write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def next_round(exp: Experiment, state: AlgoState) -> tuple[AlgoState, dict]:
    """One global round of the experiment's algorithm from ``state``: ``(state, record)``."""
    return exp.algorithm.round(exp.env, state, round_key(exp.env, state.round))


def stop_reason(history: list, state: AlgoState, t) -> str | None:
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


class TrainingHealthError(RuntimeError):
    """Training cannot make progress (e.g. every device's update non-finite, round after round)."""


def round_health(record: dict) -> tuple[int, int]:
    """``(participating devices, devices dropped as non-finite)`` of one round's record."""
    participants = sum(g["participants"] for g in record["groups"] if not g.get("skipped"))
    return participants, len(record["dropped_devices"])


def nonfinite_streak(history: list) -> int:
    """How many of the last rounds in ``history`` dropped every participating device."""
    n = 0
    for rec in reversed(history):
        participants, dropped = round_health(rec)
        if not (participants > 0 and dropped >= participants):
            break
        n += 1
    return n


def check_health(history: list, cfg: ExperimentConfig) -> None:
    """Raises :class:`TrainingHealthError` once ``train.max_nonfinite_rounds`` consecutive rounds
    dropped every participating device's update as non-finite (nothing was learnt in them)."""
    limit, streak = cfg.train.max_nonfinite_rounds, nonfinite_streak(history)
    if streak < limit:
        return
    last = history[-1]["round"]
    participants, _ = round_health(history[-1])
    raise TrainingHealthError(
        f"rounds {last - streak + 1}-{last}: every participating device's update was non-finite "
        f"({participants} of {participants} dropped in round {last}) for {streak} consecutive rounds "
        f"(train.max_nonfinite_rounds={limit}); the learning rate is likely too high (train.lr={cfg.train.lr:g}) "
        f"or the data holds extreme values: lower train.lr or check the data")


def _notify(progress: Callable | None, event: str, **info) -> None:
    if progress is not None:
        progress(event, info)


def precompile(exp: Experiment, state: AlgoState, progress: Callable[[str, dict], None] | None = None,
               workers: int | None = None) -> int:
    """Compiles every program the run's rounds may run (the algorithm's ``programs``: each group at
    each depth of its arm grid, the probe, small eager operations; and the evaluation) before
    round 1, concurrently in a thread pool of ``workers`` (default: the machine's cores); XLA
    compiles outside Python's GIL. Returns how many programs it compiled. Results are unchanged:
    the rounds call the same programs, compiled earlier (``hfl_jax.fed.xla``)."""

    env = exp.env
    thunks = list(exp.algorithm.programs(env, state)) if exp.algorithm.programs else []
    evaluate = make_evaluate(env.model)
    thunks.append(lambda: evaluate.precompile(state.trainable, env.base, exp.eval_data))
    _notify(progress, "compile", done=0, total=len(thunks))
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(t) for t in thunks]
        for i, f in enumerate(as_completed(futures)):
            f.result()
            _notify(progress, "compile", done=i + 1, total=len(thunks))
    return len(thunks)


def train_loop(exp: Experiment, out_dir: Path, state: AlgoState, history: list,
               progress: Callable[[str, dict], None] | None = None, started: float | None = None) -> dict:
    """Runs rounds from ``state`` until a stop condition; writes metrics.jsonl, checkpoints, summary.json.

    The global model is evaluated every ``train.eval_every`` rounds and always at the last round.
    A resumed run that had already stopped does no further round. ``progress(event, info)`` is told
    ``"round_start"`` (``round``, ``compiling``: arm depths this process has not run yet, so
    compiled during the round) and ``"round"`` (``record``). Raises :class:`TrainingHealthError`
    when rounds stop producing finite updates (``train.max_nonfinite_rounds``).
    ``started`` (``time.perf_counter()`` at the command's start) makes the summary's ``wall_time``
    cover set-up too.
    """
    cfg, env = exp.cfg, exp.env
    t = cfg.train
    main = is_main_process()
    mgr = ckpt.manager(out_dir / "checkpoints", cfg.checkpoint.keep)
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        _write_jsonl(metrics_path, history)   # drop lines past the checkpoint we resumed from
    writer = _tensorboard(out_dir) if (cfg.tensorboard and main) else None
    compiled: set = set()
    if t.compile_ahead and stop_reason(history, state, t) is None:
        precompile(exp, state, progress)
        compiled = {int(d) for d in exp.algorithm.depths}
    while stop_reason(history, state, t) is None:
        _notify(progress, "round_start", round=state.round + 1, total=t.rounds,
                compiling=sorted({int(d) for d in exp.algorithm.depths} - compiled))
        start = time.perf_counter()
        state, record = next_round(exp, state)
        ran = {g["depth"] for g in record["groups"] if not g.get("skipped")}
        compiled |= {int(d) for d in exp.algorithm.depths} if (ran and env.shared_depth) else ran
        if state.round % t.eval_every == 0 or stop_reason(history, state, t) is not None:
            record.update(evaluate_global(exp, state.trainable))
        record["wall_time"] = time.perf_counter() - start
        history.append(record)
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        _fault_point(state.round)
        if writer is not None:
            writer(record)
        check_health(history, cfg)   # before the checkpoint: a resume redoes the failed rounds
        done = stop_reason(history, state, t) is not None
        if state.round % cfg.checkpoint.every == 0 or done:
            ckpt.save(mgr, state.round, _arrays(state), _meta(state, history, env.assignment))
        _notify(progress, "round", record=record, total=t.rounds)
    summary = summarize(history, cfg)
    summary["stop_reason"] = stop_reason(history, state, t)
    if started is not None:
        summary["wall_time"] = time.perf_counter() - started
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(history: list, cfg: ExperimentConfig) -> dict:
    """The run's summary.json from its round records. ``wall_time`` here is the rounds' own wall
    time (``rounds_wall_time``); :func:`run` and :func:`resume` replace it by the whole command's."""
    evals = [h for h in history if "eval_accuracy" in h]
    health = [round_health(h) for h in history]
    out = {"name": cfg.name, "algorithm": cfg.algorithm.name, "seed": cfg.seed, **record_totals(history),
           "device_updates": int(sum(p for p, _ in health)),
           "dropped_updates": int(sum(d for _, d in health))}
    out["rounds_wall_time"] = out["wall_time"]
    if evals:
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


def _finish(out_dir: Path, summary: dict, started: float, plots: bool = True) -> dict:
    """Plots (unless ``plots`` is false), then ``wall_time`` = the whole command (set-up,
    compilation, rounds, plots)."""
    if is_main_process():
        if plots:
            write_plots(out_dir)
        summary["wall_time"] = time.perf_counter() - started
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _record_code(out_dir: Path, event: str, round_: int, fresh: bool) -> None:
    """Appends this process's code to the run's ``provenance.jsonl``; warns when it differs from the
    run's first record. A file that cannot be written costs a warning, never the run."""
    try:
        changed = provenance.append(out_dir, event, round_, fresh=fresh)
        # only appended lines differ from the first, so the file's first line is still the run's first record
        since = ("it started with" if changed and provenance.read(out_dir)[0].get("event") == "start"
                 else "at its first recorded resume")
    except Exception as e:  # noqa: BLE001  (a record, never a reason to fail a run)
        log.warning("could not record the code in %s: %s", out_dir / provenance.FILE, e)
        return
    if changed:
        log.warning("%s is resumed under other code than %s (%s): its rounds before and after mix the two "
                    "(%s)", out_dir, since, "; ".join(changed), provenance.FILE)


def run(cfg: ExperimentConfig, out_dir: str | Path, progress=None, *, plots: bool = True) -> dict:
    """Starts a run in ``out_dir`` (created; must not hold another run's checkpoints).

    Every config check (:func:`hfl_jax.config.preflight`) runs before any data or model is
    loaded; ``progress(event, info)`` is told ``"setup"`` and then what :func:`train_loop` tells.
    ``plots=False`` writes no PNG (``hfl-jax report RUN`` draws them later from the run's files)."""
    from hfl_jax.config import preflight

    started = time.perf_counter()
    out_dir = Path(out_dir)
    preflight(cfg, out_dir)
    _notify(progress, "setup", what="loading data and model, partitioning devices, grouping")
    exp = build(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=1) as side:
        partition = None
        if is_main_process():
            save_config(cfg, out_dir)
            _record_code(out_dir, "start", 0, fresh=True)
            # partition.json and .png are drawn beside the compilation (XLA works outside the GIL)
            partition = side.submit(write_partition, exp, out_dir, plot=plots)
        summary = train_loop(exp, out_dir, exp.initial, [], progress, started)
        if partition is not None:
            partition.result()
    return _finish(out_dir, summary, started, plots)


def resume(out_dir: str | Path, progress=None, *, plots: bool = True) -> dict:
    """Continues the run in ``out_dir`` from its newest checkpoint that restores cleanly
    (bit-identical to an uninterrupted run, wall times aside). Newer checkpoints that fail to
    restore are moved aside to ``checkpoints.corrupt/`` with a one-line warning naming the bad
    file; with no usable checkpoint the run restarts from round 0, and says so."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no config.yaml: not a hfl-jax run directory")
    cfg = load_run_config(out_dir)   # written with absolute paths (older runs: cwd-relative)
    _notify(progress, "setup", what="loading data and model, partitioning devices, grouping")
    exp = build(cfg)
    found = ckpt.restore_newest_good(out_dir / "checkpoints", cfg.checkpoint.keep, _arrays(exp.initial),
                                     report=log.warning)
    if found is None:
        log.warning("no usable checkpoint in %s: starting from round 0", out_dir / "checkpoints")
        state, history = exp.initial, []
    else:
        step, arrays, meta = found
        if not np.array_equal(np.asarray(meta["assignment"]), exp.env.assignment):
            raise RuntimeError("the groups rebuilt from the config differ from the checkpoint's")
        state = _state_from(meta, arrays, exp.initial, exp.env.axis)
        cached = exp.eval_data.hidden_layer
        if cached:
            from hfl_jax.fed.frozen_cache import check_untouched
            check_untouched(state.trainable["lora"], cached)
        history = meta["history"]
        log.info("resuming %s from checkpoint %d", out_dir, step)
    if is_main_process():   # with no usable checkpoint the run starts over: a fresh record
        _record_code(out_dir, "resume", 0 if found is None else found[0], fresh=found is None)
    summary = train_loop(exp, out_dir, state, history, progress, started)
    return _finish(out_dir, summary, started, plots)


def grouping_record(cfg: ExperimentConfig) -> dict:
    """partition.json's ``grouping``: the signal and privacy mechanism the groups were built from
    (``epsilon`` null: no noise; ``noise_scale``: the Laplace b or Gaussian sigma of each count)."""
    from hfl_jax.algos.privacy import noise_scale

    g = cfg.algorithm.grouping
    noisy = g.signal == "labels" and g.mechanism != "none" and np.isfinite(g.epsilon)
    return {"signal": g.signal, "mechanism": g.mechanism if noisy else "none",
            "epsilon": float(g.epsilon) if noisy else None,
            "delta": float(g.delta) if noisy and g.mechanism == "gaussian" else None,
            "noise_scale": float(noise_scale(g.mechanism, g.epsilon, g.delta)) if noisy else 0.0}


def write_partition(exp: Experiment, out_dir: Path, plot: bool = True) -> dict:
    """partition.json (per-device sizes, label histograms, KL; per-group KL and sizes) and, with
    ``plot``, partition.png."""
    from hfl_jax.data import partition_report, plot_partition

    report = partition_report(exp.train_labels, exp.parts, len(exp.label_names))
    if plot:
        plot_partition(report, out_dir / "partition.png", class_names=list(exp.label_names))
    groups = grouping_lib.group_report(exp.label_counts, exp.env.assignment, speeds=exp.env.profiles["flops"])
    info = {"devices": report.to_dict(), "groups": ckpt.to_json(groups),
            "assignment": exp.env.assignment.tolist(),
            "grouping": grouping_record(exp.cfg)}
    (out_dir / "partition.json").write_text(json.dumps(ckpt.to_json(info), indent=1))
    return info


def write_plots(out_dir: Path) -> None:
    try:
        from hfl_jax.report import plot_runs
    except ImportError:
        return
    plot_runs([out_dir], out_dir)
