"""Typed, frozen experiment configuration loaded from YAML with dotted overrides.

``load_config(path, overrides)`` maps a YAML file onto :class:`ExperimentConfig`;
an unknown key, a wrong type or an impossible value raises :class:`ConfigError`
naming the key (e.g. ``train.rounds``) before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from hfl_jax.errors import ConfigError   # re-exported: hfl_jax.config.ConfigError is the one class


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """A small random model (smoke tests; no download): a BERT encoder for ``model.name: tiny``, a
    Llama-architecture decoder for ``model.name: tiny-decoder``."""
    hidden_size: int = 32
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 64
    vocab_size: int = 30522  # matches the packaged MiniLM tokenizer; tiny-decoder: its built tokenizer's size cap
    num_kv_heads: Optional[int] = None   # tiny-decoder: grouped-query attention's key/value heads (default num_heads)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm-l6"             # alias, local directory, hub id, "tiny" or "tiny-decoder" (random, see `tiny`)
    tiny: TinyModelConfig = TinyModelConfig()
    compute_dtype: str = "float32"      # float32 | bfloat16 (mixed precision: hfl_jax/models/precision.py)
    attention: str = "auto"             # auto | xla | cudnn | einsum (BERT/RoBERTa attention kernel)
    remat: str = "none"                 # none | dots | dense | full (hfl_jax/models/precision.py)
    unroll: str = "auto"                # auto | always | never: unroll the layer loop (driver.auto_unroll)


@dataclasses.dataclass(frozen=True)
class LoRASection:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "sst2"                  # sst2 | qnli | qqp | mnli | custom | instruct (decoders)
    data_dir: Optional[str] = None      # GLUE-layout directory; default $HFL_DATA_DIR, then the hub
    tokenizer: Optional[str] = None     # default: model.name ("minilm-l6" for model.name == "tiny")
    max_length: int = 64
    train_subset: Optional[int] = None  # use a seeded random subset of this many training examples
    eval_subset: Optional[int] = None
    custom: Optional[dict] = None       # CustomSpec fields for task == custom
    instruct: Optional[dict] = None     # InstructSpec fields for task == instruct (hfl_jax/data/instruct.py)
    # Tuning protocol: carve this many examples out of the training split as a validation set,
    # always with data.validation_seed (the same carve for every run seed and method) and never
    # trained on; evaluate: "validation" scores every round on it (tune hyperparameters there),
    # "test" on the task's evaluation split (GLUE dev, a custom test file: final reports only).
    validation_size: int = 0
    validation_seed: int = 0
    evaluate: str = "test"              # test | validation
    # Exact speed-up: each group's device data (and the eval set) is cut to the smallest length
    # bucket >= its longest real sequence (trailing all-padding columns only; results unchanged up
    # to float reordering). Groups may then differ in T: one compilation per (depth, T).
    trim_padding: bool = True
    length_multiple: int = 8            # buckets: multiples of this ...
    length_buckets: Optional[tuple[int, ...]] = None   # ... or exactly these lengths (overrides)
    # Exact speed-up: pack several sequences into each row of a training step and of the eval set
    # (hfl_jax/data/packing.py; results equal up to float reordering), so a step pays for real tokens,
    # not for padding. BERT/RoBERTa and the decoders (DeBERTa and train.cache_frozen_layers run unpacked). Rows of
    # pack_length tokens (default 2 x max_length); one compilation per number of rows a round needs.
    pack: bool = True
    pack_length: Optional[int] = None
    # Rows per packed round: "run" = the most any round of the run needs (computed at start-up from
    # the run's seeded batch draws), one program per depth, compiled ahead; "round" = each round's
    # own (fewer rows, but a compilation per new row count, mid-run). Results equal up to float reordering.
    pack_rows: str = "run"


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    num_devices: int = 20
    method: str = "dirichlet"           # iid | dirichlet | pathological | quantity
    alpha: float = 0.1
    min_samples: int = 0
    classes_per_device: int = 1
    beta: float = 0.5


@dataclasses.dataclass(frozen=True)
class DevicesConfig:
    profiles: Optional[str] = None      # YAML/CSV file of device profiles; default: drawn from tiers
    tiers: tuple[str, ...] = ("tx2", "nx", "agx", "orin")
    bandwidth_jitter: float = 0.5
    edge_cloud_bandwidth: float = 100e6  # bytes/s between a group's edge server and the cloud (wired backhaul)
    # Two-tier links (docs/time_model.md, "Links"): hierarchical algorithms' devices talk to an edge
    # server over their LAN links (up_bw/down_bw); flat algorithms' devices talk to the cloud over
    # their WAN links (cloud_up_bw/cloud_down_bw). false: the single-tier model of earlier versions
    # (every device link is the LAN one, no latencies).
    two_tier: bool = True
    edge_latency: float = 0.005         # s per message, device <-> edge server (Wi-Fi LAN)
    cloud_latency: float = 0.05         # s per message on a path to the cloud (WAN)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rounds: int = 20                    # global rounds
    local_steps: int = 5                # E
    batch_size: int = 16                # B per device
    optimizer: str = "adamw"            # adamw | adam | sgd
    lr: float = 5e-4
    weight_decay: float = 0.0
    clip_norm: Optional[float] = None   # clip each local step's gradient to this global norm (None: no clipping)
    eval_every: int = 1
    eval_batch_size: int = 128
    target_accuracy: Optional[float] = None   # stop once reached
    time_budget: Optional[float] = None       # stop once the simulated clock passes this (s)
    participation: float = 1.0          # fraction of each group's devices sampled per round
    availability: float = 1.0           # probability that a sampled device is available
    chunk_size: Optional[int] = None    # max simulated devices vmapped at once
    # Stop with an error once this many consecutive rounds dropped every participating device's
    # update as non-finite (a diverged run learns nothing; usually the learning rate).
    max_nonfinite_rounds: int = 2
    shard: bool = True                  # shard the device axis over all local accelerators
    # Compute the output of the bottom L - max(arm depths) layers once per example at setup and
    # train/probe/evaluate from it. Exact while those layers' LoRA is never trained (refused when
    # an arm has depth L). Memory: 4 * T * H bytes per training and eval example.
    cache_frozen_layers: bool = False
    # Compile every program the rounds may run before round 1, concurrently (hfl_jax.driver.precompile);
    # false: each compiles when a round first needs it. Results are identical either way.
    compile_ahead: bool = True
    # Every group's device axis is padded to the largest group's size (absent slots are masked), so
    # groups of different sizes share one program per depth; "exact": each group its own size (no
    # padding work, one program per distinct size and depth; results equal to float rounding).
    group_padding: str = "largest"      # largest | exact
    # "per_depth": one group-round program per fine-tuning depth (the frozen layers get no backward
    # pass); "shared": one program for every depth (the depth is an argument; the frozen layers'
    # backward pass is computed and discarded): fewer compilations, slower steps at shallow depths.
    # Same values either way up to float rounding (benchmarks/RESULTS.md, issue 16).
    depth_program: str = "per_depth"    # per_depth | shared


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    reward: str = "detrended"   # "detrended": log(progress / global round time), common drift cancels;
                                # "ema": the original reward (progress / group time over an EMA), plain D-UCB
    phi: float = 0.5            # exploration (detrended: in standard errors; ema: in reward units)
    gamma: float = 0.98         # discount (window ~ 1 / (1 - gamma) pulls); ema's old default was 0.95
    nu: float = 0.5
    time_budget: Optional[float] = None   # per-global-round simulated time budget (s); None = none
    time_budget_factor: Optional[float] = None   # auto budget: factor x median estimated arm time, per group
    # Examples each device holds out of training to score the probe on (at most a quarter of its
    # data); 0: the probe scores the devices' training examples (the behaviour of earlier versions).
    probe_holdout: int = 0


@dataclasses.dataclass(frozen=True)
class GroupingConfig:
    """What devices upload for grouping (docs/algorithm.md, "Grouping without label histograms")."""
    signal: str = "labels"              # labels: label histograms, KL; embedding: mean frozen-model embedding, cosine
    mechanism: str = "none"             # none | laplace | gaussian: local DP noise on each label histogram
    epsilon: float = math.inf           # every device's privacy budget (.inf: no noise, the plain grouping)
    delta: float = 1e-5                 # gaussian only: (epsilon, delta)-DP, analytic Gaussian mechanism


@dataclasses.dataclass(frozen=True)
class HetLoRAConfig:
    # ranks by device capability tier (slow -> fast), each <= lora.rank; null: derived from lora.rank,
    # (r//4, r//2, r) deduplicated (hfl_jax.algos.hetlora.default_ranks; (2, 4, 8) for rank 8)
    ranks: Optional[tuple[int, ...]] = None
    prune_factor: float = 0.5           # rank self-pruning: r <- max(min_rank, floor(r * factor))
    prune_threshold: float = 0.05       # ... when ||pruned part|| / ||kept part|| is below this
    min_rank: int = 1
    sparsity: str = "adapter"           # aggregation weights x samples: "adapter" ||A'B'||_F (the paper's
                                        # ||Delta W_k||_F), "update" ||A'B' - AB||_F (the round's change),
                                        # "none" (sample counts only)
    padding: str = "zeros"              # "zeros": zero-padded adapters averaged over all devices (the paper);
                                        # "holders": each rank component averaged over the devices holding it


@dataclasses.dataclass(frozen=True)
class FlexLoRAConfig:
    ranks: Optional[tuple[int, ...]] = None   # as algorithm.hetlora.ranks (null: derived from lora.rank)


@dataclasses.dataclass(frozen=True)
class FedProxConfig:
    mu: float = 0.01                    # proximal weight: local loss + (mu / 2) ||w - w_global||^2 (0: FedLoRA)


@dataclasses.dataclass(frozen=True)
class ServerOptConfig:
    """The server optimizer of fedavgm, fedadam, fedyogi, fedadagrad (Reddi et al., 2021), applied to the
    pseudo-gradient x - mean(y_i) (hfl_jax.algos.fedopt)."""
    lr: Optional[float] = None          # server learning rate; null: 1.0 for fedavgm, 0.01 for the adaptive ones
    momentum: float = 0.9               # fedavgm's heavy-ball momentum (0: plain server SGD)
    beta1: float = 0.9                  # fedadam, fedyogi: first-moment decay
    beta2: float = 0.99                 # fedadam, fedyogi: second-moment decay
    eps: float = 1e-3                   # adaptivity tau: fedadam/fedyogi's eps; fedadagrad's v_{-1} = eps^2


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "hierfedlora"           # a key of hfl_jax.algos.ALGORITHMS
    num_groups: int = 4
    lam: float = 0.0                    # grouping: weight of the speed-spread term
    sample_balance: float = 0.0         # grouping: weight of the sample-balance term (0: the paper's objective)
    grouping: GroupingConfig = GroupingConfig()   # grouping signal and its privacy
    depths: Optional[tuple[int, ...]] = None   # depth grid (None: 1, 2, 4, ... up to L, and L)
    # Which d layers a fine-tuning depth d trains (every depth arm): top (layers L-d .. L-1, the
    # paper's), bottom (0 .. d-1), spread (d evenly spaced, the top one included); hfl_jax.models.lora.layer_mask
    layer_policy: str = "top"
    taus: tuple[int, ...] = (1, 2, 3)   # intra-group aggregation frequencies
    fixed_depth: Optional[int] = None   # hierfedlora_fixed (None: L // 2)
    fixed_tau: int = 1
    bandit: BanditConfig = BanditConfig()
    hetlora: HetLoRAConfig = HetLoRAConfig()
    flexlora: FlexLoRAConfig = FlexLoRAConfig()
    fedprox: FedProxConfig = FedProxConfig()
    server: ServerOptConfig = ServerOptConfig()


# Config sections only one algorithm reads (``algorithm.<section>`` -> that algorithm's name): two runs
# of another algorithm that differ only there are the same run (``hfl_jax.sweep`` compares them so).
ALGORITHM_SECTIONS = {"hetlora": "hetlora", "flexlora": "flexlora", "fedprox": "fedprox"}

# Defaults that changed after their field was added: a run directory's ``config.yaml`` written before
# the field existed ran with the old behaviour, so :func:`load_run_config` fills these where absent.
# algorithm.hetlora.padding: HetLoRA averaged each rank component over its holders until 2026-11-29;
# algorithm.hetlora.sparsity: its weights were the round's update norms before the field existed (c2177d2);
# algorithm.bandit.reward: R-UCB's reward was the EMA-referenced one before the field existed (f1c53bd).
# algorithm.{hetlora,flexlora}.ranks: [2, 4, 8] whatever lora.rank until they became null (derived
# from lora.rank); run directories store the resolved list, so this only serves files without the key.
RUN_LEGACY_DEFAULTS = ((("algorithm", "hetlora", "padding"), "holders"),
                       (("algorithm", "hetlora", "sparsity"), "update"),
                       (("algorithm", "bandit", "reward"), "ema"),
                       (("algorithm", "hetlora", "ranks"), [2, 4, 8]),
                       (("algorithm", "flexlora", "ranks"), [2, 4, 8]))


def parent_node(raw: Any, keys: tuple) -> dict | None:
    """The dict of config dict ``raw`` that holds key path ``keys``' last key (``None`` if a step is missing)."""
    node = raw
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def fill_run_legacy(raw: dict) -> dict:
    """A run directory's stored config (a dict) with :data:`RUN_LEGACY_DEFAULTS` filled where absent."""
    raw = json.loads(json.dumps(raw))
    for keys, value in RUN_LEGACY_DEFAULTS:
        node = parent_node(raw, keys)
        if node is not None and keys[-1] not in node:
            node[keys[-1]] = value
    return raw


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """What a decoder's evaluation generates (:mod:`hfl_jax.objectives.causal_lm`); encoders ignore it."""
    generate: int = 0                   # greedy generations on this many evaluation examples (0: none)
    max_new_tokens: int = 64
    extractor: str = "exact"            # gsm8k | label_word | exact (hfl_jax.data.metrics_text.EXTRACTORS)
    batch_size: int = 16                # prompts generated for at once


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1                      # save every N global rounds (and at the end)
    keep: int = 3                       # keep the last k checkpoints


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    lora: LoRASection = LoRASection()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    devices: DevicesConfig = DevicesConfig()
    train: TrainConfig = TrainConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tensorboard: bool = False


# --- generic dataclass <- dict ---------------------------------------------------------------------

def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key + ".")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads "100e6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Builds dataclass ``cls`` from a nested mapping; unknown keys and wrong types raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), for YAML/JSON."""
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.rounds=4", "lora.targets=[query,value]"]`` -> updated copy; values parsed as YAML."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r} ({str(e).splitlines()[0]})") from None
    return data


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: ExperimentConfig, num_layers: int | None = None) -> ExperimentConfig:
    """Checks values that types cannot (ranges, cross-field rules). ``num_layers`` adds depth checks
    and builds the algorithm once (its builder checks the settings it uses)."""
    from hfl_jax.algos import ALGORITHMS
    from hfl_jax.data.partition import PARTITIONERS
    from hfl_jax.fed.group_aggregators import SPARSITY
    from hfl_jax.algos.selectors import REWARDS
    from hfl_jax.models.lora import LAYER_POLICIES

    t, p, a, l = cfg.train, cfg.partition, cfg.algorithm, cfg.lora
    _require(cfg.name.strip() != "", "name", "must not be empty")
    for key, v in [("train.rounds", t.rounds), ("train.local_steps", t.local_steps),
                   ("train.batch_size", t.batch_size), ("train.eval_every", t.eval_every),
                   ("train.eval_batch_size", t.eval_batch_size), ("partition.num_devices", p.num_devices),
                   ("algorithm.num_groups", a.num_groups), ("lora.rank", l.rank),
                   ("data.max_length", cfg.data.max_length), ("checkpoint.every", cfg.checkpoint.every),
                   ("checkpoint.keep", cfg.checkpoint.keep), ("algorithm.fixed_tau", a.fixed_tau)]:
        _require(v >= 1, key, f"must be >= 1, got {v}")
    _require(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be a finite number > 0, got {t.lr}")
    _require(t.max_nonfinite_rounds >= 1, "train.max_nonfinite_rounds", f"must be >= 1, got {t.max_nonfinite_rounds}")
    for key, v in [("train.weight_decay", t.weight_decay), ("lora.alpha", l.alpha), ("partition.alpha", p.alpha),
                   ("partition.beta", p.beta), ("devices.edge_cloud_bandwidth", cfg.devices.edge_cloud_bandwidth)]:
        _require(math.isfinite(v), key, f"must be a finite number, got {v}")
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(t.clip_norm is None or (math.isfinite(t.clip_norm) and t.clip_norm > 0), "train.clip_norm",
             f"must be a finite number > 0 (or null), got {t.clip_norm}")
    _require(t.time_budget is None or t.time_budget > 0, "train.time_budget", "must be > 0 (seconds)")
    for key, v in [("data.train_subset", cfg.data.train_subset), ("data.eval_subset", cfg.data.eval_subset)]:
        _require(v is None or v >= 1, key, f"must be >= 1, got {v}")
    _require(p.min_samples >= 0, "partition.min_samples", f"must be >= 0, got {p.min_samples}")
    _require(p.classes_per_device >= 1, "partition.classes_per_device", "must be >= 1")
    _require(p.beta > 0, "partition.beta", f"must be > 0, got {p.beta}")
    _require(cfg.devices.edge_cloud_bandwidth > 0, "devices.edge_cloud_bandwidth", "must be > 0 (bytes/s)")
    for key, v in [("devices.edge_latency", cfg.devices.edge_latency), ("devices.cloud_latency", cfg.devices.cloud_latency)]:
        _require(math.isfinite(v) and v >= 0, key, f"must be a finite number >= 0 (seconds), got {v}")
    _require(0 <= cfg.devices.bandwidth_jitter < 1, "devices.bandwidth_jitter", "must be in [0, 1)")
    _require(a.bandit.time_budget is None or a.bandit.time_budget > 0, "algorithm.bandit.time_budget",
             "must be > 0 (seconds)")
    _require(l.alpha > 0, "lora.alpha", f"must be > 0, got {l.alpha}")
    _require(t.optimizer in ("adamw", "adam", "sgd"), "train.optimizer", f"unknown optimizer {t.optimizer!r}")
    _require(0 < t.participation <= 1, "train.participation", f"must be in (0, 1], got {t.participation}")
    _require(0 < t.availability <= 1, "train.availability", f"must be in (0, 1], got {t.availability}")
    _require(t.chunk_size is None or t.chunk_size >= 1, "train.chunk_size", "must be >= 1")
    _require(cfg.data.length_multiple >= 1, "data.length_multiple", "must be >= 1")
    _require(cfg.data.pack_rows in ("run", "round"), "data.pack_rows",
             f"must be 'run' or 'round', got {cfg.data.pack_rows!r}")
    _require(cfg.data.pack_length is None or cfg.data.pack_length >= cfg.data.max_length, "data.pack_length",
             "must be >= data.max_length (a row holds at least one whole sequence)")
    _require(cfg.data.length_buckets is None or (len(cfg.data.length_buckets) > 0
                                                  and min(cfg.data.length_buckets) >= 1),
             "data.length_buckets", "must be a non-empty list of ints >= 1")
    _require(a.name in ALGORITHMS, "algorithm.name", f"unknown algorithm {a.name!r}; one of {', '.join(ALGORITHMS)}")
    _require(a.num_groups <= p.num_devices, "algorithm.num_groups",
             f"{a.num_groups} groups exceed partition.num_devices={p.num_devices}")
    _require(a.lam >= 0, "algorithm.lam", "must be >= 0")
    _require(cfg.data.validation_size >= 0, "data.validation_size", f"must be >= 0, got {cfg.data.validation_size}")
    _require(cfg.data.evaluate in ("test", "validation"), "data.evaluate",
             f"must be 'test' or 'validation', got {cfg.data.evaluate!r}")
    _require(cfg.data.evaluate == "test" or cfg.data.validation_size > 0, "data.evaluate",
             "'validation' needs data.validation_size > 0 (the examples carved from the training split)")
    _require(a.bandit.probe_holdout >= 0, "algorithm.bandit.probe_holdout", f"must be >= 0, got {a.bandit.probe_holdout}")
    _require(math.isfinite(a.sample_balance) and a.sample_balance >= 0, "algorithm.sample_balance",
             f"must be a finite number >= 0, got {a.sample_balance}")
    _check_grouping(a)
    _require(len(a.taus) > 0 and min(a.taus) >= 1, "algorithm.taus", "must be a non-empty list of ints >= 1")
    _require(a.depths is None or len(a.depths) > 0, "algorithm.depths",
             "the arm grid is empty; list depths (e.g. [2, 4]) or omit the key for the default 1, 2, 4, ..., L")
    _require(a.depths is None or min(a.depths) >= 1, "algorithm.depths", f"depths must be >= 1, got {a.depths}")
    _require(a.layer_policy in LAYER_POLICIES, "algorithm.layer_policy",
             f"one of {', '.join(LAYER_POLICIES)}; got {a.layer_policy!r}")
    family = family_of_name(cfg.model.name)
    if family is not None:   # else model_num_layers checks them against the checkpoint's config.json
        _check_lora_targets(l.targets, family)
    _check_data(cfg.data)
    _check_evaluation(cfg, family)
    _require(p.method in PARTITIONERS, "partition.method",
             f"unknown partition method {p.method!r}; one of {', '.join(PARTITIONERS)}")
    _require(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")
    _require(cfg.model.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype", "float32 or bfloat16")
    _require(cfg.model.attention in ("auto", "xla", "cudnn", "einsum"), "model.attention",
             f"one of auto, xla, cudnn, einsum; got {cfg.model.attention!r}")
    _require(cfg.model.remat in ("none", "dots", "dense", "full"), "model.remat",
             f"one of none, dots, dense, full; got {cfg.model.remat!r}")
    _require(cfg.train.group_padding in ("largest", "exact"), "train.group_padding",
             f"one of largest, exact; got {cfg.train.group_padding!r}")
    _require(cfg.train.depth_program in ("per_depth", "shared"), "train.depth_program",
             f"one of per_depth, shared; got {cfg.train.depth_program!r}")
    _require(cfg.model.unroll in ("auto", "always", "never"), "model.unroll",
             f"one of auto, always, never; got {cfg.model.unroll!r}")
    b = a.bandit
    _require(0 < b.gamma <= 1, "algorithm.bandit.gamma", f"must be in (0, 1], got {b.gamma}")
    _require(b.phi >= 0 and b.nu >= 0, "algorithm.bandit", "phi and nu must be >= 0")
    _require(b.reward in REWARDS, "algorithm.bandit.reward",
             f"unknown reward {b.reward!r}; one of {', '.join(REWARDS)}")
    _require(b.time_budget_factor is None or b.time_budget_factor > 0, "algorithm.bandit.time_budget_factor",
             "must be > 0")
    _require(b.time_budget is None or b.time_budget_factor is None, "algorithm.bandit",
             "set time_budget (seconds) or time_budget_factor (automatic), not both")
    h = a.hetlora
    _require(0 < h.prune_factor < 1, "algorithm.hetlora.prune_factor", "must be in (0, 1)")
    _require(h.min_rank >= 1, "algorithm.hetlora.min_rank", f"must be >= 1, got {h.min_rank}")
    _require(h.prune_threshold >= 0, "algorithm.hetlora.prune_threshold", "must be >= 0")
    _require(h.padding in ("zeros", "holders"), "algorithm.hetlora.padding",
             f"one of zeros, holders; got {h.padding!r}")
    _require(h.sparsity in SPARSITY, "algorithm.hetlora.sparsity",
             f"must be one of {', '.join(SPARSITY)}, got {h.sparsity!r}")
    _require(math.isfinite(a.fedprox.mu) and a.fedprox.mu >= 0, "algorithm.fedprox.mu",
             f"must be a finite number >= 0, got {a.fedprox.mu}")
    so = a.server
    _require(so.lr is None or (math.isfinite(so.lr) and so.lr > 0), "algorithm.server.lr",
             f"must be a finite number > 0 (or null), got {so.lr}")
    for key, v in (("momentum", so.momentum), ("beta1", so.beta1), ("beta2", so.beta2)):
        _require(0 <= v < 1, f"algorithm.server.{key}", f"must be in [0, 1), got {v}")
    _require(math.isfinite(so.eps) and so.eps > 0, "algorithm.server.eps", f"must be a finite number > 0, got {so.eps}")
    if t.target_accuracy is not None:
        _require(0 < t.target_accuracy <= 1, "train.target_accuracy", "must be in (0, 1]")
    if num_layers is not None:
        for d in a.depths or ():
            _require(1 <= d <= num_layers, "algorithm.depths",
                     f"depth {d} is outside [1, {num_layers}] (the model has {num_layers} layers)")
        if a.fixed_depth is not None:
            _require(1 <= a.fixed_depth <= num_layers, "algorithm.fixed_depth",
                     f"depth {a.fixed_depth} is outside [1, {num_layers}] (the model has {num_layers} layers)")
        algorithm = ALGORITHMS[a.name](cfg, num_layers)   # raises ConfigError for settings it cannot use
        check_group_signal(cfg, algorithm)
    return cfg


def check_group_signal(cfg: ExperimentConfig, algorithm) -> None:
    """``algorithm.grouping.signal`` is one the built algorithm's grouping reads (``group_signals``)."""
    g = cfg.algorithm.grouping
    _require(g.signal in algorithm.group_signals, "algorithm.grouping.signal",
             f"{cfg.algorithm.name} groups devices by {', '.join(algorithm.group_signals)}, not by {g.signal}")


def _check_grouping(a: AlgorithmConfig) -> None:
    """``algorithm.grouping``: known signal and mechanism, epsilon > 0, delta in (0, 1), noise only on labels."""
    from hfl_jax.algos.privacy import MECHANISMS

    g = a.grouping
    _require(g.signal in ("labels", "embedding"), "algorithm.grouping.signal",
             f"one of labels, embedding; got {g.signal!r}")
    _require(g.mechanism in MECHANISMS, "algorithm.grouping.mechanism",
             f"one of {', '.join(MECHANISMS)}; got {g.mechanism!r}")
    _require(not math.isnan(g.epsilon) and g.epsilon > 0, "algorithm.grouping.epsilon",
             f"must be > 0 (.inf: no noise), got {g.epsilon}")
    _require(0 < g.delta < 1, "algorithm.grouping.delta", f"must be in (0, 1), got {g.delta}")
    _require(g.signal == "labels" or g.mechanism == "none", "algorithm.grouping.mechanism",
             f"noise applies to label histograms (signal: labels), not to signal: {g.signal}")


def family_of_name(name: str) -> str | None:
    """A model's ``model_type`` when its name alone tells (``tiny``, ``tiny-decoder``, an alias, a
    known encoder checkpoint); ``None`` when only its ``config.json`` can."""
    from hfl_jax.models.hub import ALIASES
    from hfl_jax.models.tiny import TINY_MODELS

    if name in TINY_MODELS:
        return TINY_MODELS[name][1]
    if name in ALIASES or name in KNOWN_LAYERS:
        return "bert"
    return None


def _check_lora_targets(targets: tuple, family: str | None = None) -> None:
    from hfl_jax.models.families import lora_targets_of

    TARGETS = lora_targets_of(family or "bert")
    _require(len(targets) > 0, "lora.targets", f"must name at least one of {', '.join(TARGETS)}")
    for t in targets:
        _require(t in TARGETS, "lora.targets",
                 f"{t!r} is not a LoRA target{' of ' + family + ' models' if family else ''}; "
                 f"choose from {', '.join(TARGETS)}")
    _require(len(set(targets)) == len(targets), "lora.targets", f"lists a target twice: {list(targets)}")


def _check_evaluation(cfg: ExperimentConfig, family: str | None) -> None:
    """``evaluation.*`` ranges, and ``data.task: instruct`` only with a decoder model."""
    from hfl_jax.data.metrics_text import EXTRACTORS
    from hfl_jax.models.families import DECODER_MODEL_TYPES

    e = cfg.evaluation
    _require(e.generate >= 0, "evaluation.generate", f"must be >= 0, got {e.generate}")
    for key, v in (("evaluation.max_new_tokens", e.max_new_tokens), ("evaluation.batch_size", e.batch_size)):
        _require(v >= 1, key, f"must be >= 1, got {v}")
    _require(e.extractor in EXTRACTORS, "evaluation.extractor",
             f"unknown extractor {e.extractor!r}; one of {', '.join(EXTRACTORS)}")
    if cfg.data.task == "instruct" and family is not None:
        _require(family in DECODER_MODEL_TYPES, "data.task",
                 f"instruct needs a decoder model (model.name {cfg.model.name!r} is a {family} encoder)")


def _check_data(d: DataConfig) -> None:
    """``data.task`` and the shape of ``data.custom`` (its files are checked by :func:`preflight`)."""
    from hfl_jax.data.tasks import TASK_NAMES, SpecError, custom_spec

    tasks = (*TASK_NAMES, "instruct")
    _require(d.task in tasks, "data.task", f"unknown task {d.task!r}; one of {', '.join(tasks)}")
    if d.task != "instruct":
        _require(d.instruct is None, "data.instruct",
                 f"is only used with data.task: instruct (data.task is {d.task!r})")
    else:
        from hfl_jax.data.instruct import instruct_spec
        _require(d.instruct is not None, "data.instruct",
                 "data.task: instruct needs data.instruct: {train: FILE, prompt: FIELD, response: FIELD, ...}")
        try:
            instruct_spec(d.instruct)
        except SpecError as e:
            raise ConfigError(f"data.instruct.{e.field}: {e.reason}") from None
    if d.task != "custom":
        _require(d.custom is None, "data.custom", f"is only used with data.task: custom (data.task is {d.task!r})")
        return
    _require(d.custom is not None, "data.custom",
             "data.task: custom needs data.custom: {train: FILE, text_a: COLUMN, label: COLUMN, ...}")
    try:
        custom_spec(d.custom)
    except SpecError as e:
        raise ConfigError(f"data.custom.{e.field}: {e.reason}") from None


# Layer counts of common checkpoints, so configs are validated offline before any download.
KNOWN_LAYERS = {
    "roberta-base": 12, "FacebookAI/roberta-base": 12, "roberta-large": 24, "FacebookAI/roberta-large": 24,
    "bert-base-uncased": 12, "google-bert/bert-base-uncased": 12,
    "microsoft/deberta-base": 12, "microsoft/deberta-large": 24,
    "microsoft/deberta-v3-base": 12, "microsoft/deberta-v3-large": 24,
}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_name(name: str, key: str = "model.name") -> None:
    """``name`` is ``tiny``, an alias, an existing model directory, or shaped like a hub id."""
    from hfl_jax.models.hub import ALIASES

    from hfl_jax.models.tiny import TINY_MODELS

    if name in TINY_MODELS and key == "model.name" or name in ALIASES:
        return
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        _require(path.is_dir(), key, f"model directory {path} does not exist"
                 if not path.exists() else f"{path} is not a directory")
        if key == "data.tokenizer":   # a tokenizer directory needs no model config
            _require(any((path / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")),
                     key, f"{path} has neither tokenizer.json, tokenizer_config.json nor config.json "
                          f"(expected a Hugging Face tokenizer or model directory)")
            return
        _require((path / "config.json").is_file(), key,
                 f"{path} has no config.json (expected a Hugging Face model directory)")
        return
    _require(HUB_ID.match(name) is not None, key,
             f"{name!r} is neither {'tiny, ' if key == 'model.name' else ''}an alias ({', '.join(ALIASES)}), "
             f"an existing directory, nor a hub id ('name' or 'org/name')")


def _model_json(cfg: ExperimentConfig) -> dict | None:
    """The model's config.json without loading weights (None for ``tiny`` or when unreachable)."""
    import json

    from hfl_jax.models.tiny import TINY_MODELS

    if cfg.model.name in TINY_MODELS:
        return None
    try:
        from hfl_jax.models.hub import resolve_model_dir
        return json.loads((resolve_model_dir(cfg.model.name) / "config.json").read_text())
    except Exception:
        return None


def model_num_layers(cfg: ExperimentConfig) -> int | None:
    """Layer count from the model's config.json without loading weights (None if unreachable).
    Also checks ``model.name`` and ``lora.targets`` against the model's family."""
    check_model_name(cfg.model.name)
    from hfl_jax.models.tiny import TINY_MODELS

    if cfg.model.name in TINY_MODELS:
        return cfg.model.tiny.num_layers
    if cfg.model.name in KNOWN_LAYERS:
        return KNOWN_LAYERS[cfg.model.name]
    hf = _model_json(cfg)
    if hf is None:
        return None
    from hfl_jax.models.families import DECODER_MODEL_TYPES
    from hfl_jax.models.config import SUPPORTED_MODEL_TYPES

    family = hf.get("model_type")
    supported = (*SUPPORTED_MODEL_TYPES, *DECODER_MODEL_TYPES)
    _require(family in supported, "model.name",
             f"{cfg.model.name}: config.json's model_type {family!r} is not supported ({', '.join(supported)})")
    _check_lora_targets(cfg.lora.targets, family)
    _check_evaluation(cfg, family)
    try:
        return int(hf["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"model.name: {cfg.model.name}: config.json has no integer num_hidden_layers") from None


def _check_out(out_dir: Path) -> None:
    key = "--out"
    if out_dir.exists():
        _require(out_dir.is_dir(), key, f"{out_dir} is a file, not a directory")
        ck = out_dir / "checkpoints"
        _require(not (ck.is_dir() and any(ck.iterdir())), key,
                 f"{out_dir} already holds a run; use `hfl-jax resume {out_dir}` or another --out")
        _require(os.access(out_dir, os.W_OK), key, f"{out_dir} is not writable")
        return
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    _require(parent.is_dir(), key, f"cannot create {out_dir}: {parent} is a file")
    _require(os.access(parent, os.W_OK), key, f"cannot create {out_dir}: {parent} is not writable")


def _check_profiles(cfg: ExperimentConfig) -> None:
    from hfl_jax.fed.profiles import draw_profiles, load_profiles

    d, n = cfg.devices, cfg.partition.num_devices
    if d.profiles is None:
        try:
            draw_profiles(1, tiers=d.tiers, seed=0)
        except ValueError as e:
            raise ConfigError(f"devices.tiers: {str(e).splitlines()[0]}") from None
        return
    path = Path(d.profiles)
    _require(path.is_file(), "devices.profiles", f"file {path} does not exist")
    try:
        profiles = load_profiles(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"devices.profiles: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                          f"offset {e.start})") from None
    except Exception as e:  # noqa: BLE001 - yaml/csv/value errors: one line naming the file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"devices.profiles: {path}: not a valid profile file ({first})") from None
    _require(len(profiles) == n, "devices.profiles",
             f"{path} has {len(profiles)} profiles but partition.num_devices={n}")


def preflight(cfg: ExperimentConfig, out_dir: str | Path | None = None) -> ExperimentConfig:
    """Every check that reads files but loads no data or model: ``data.custom`` files (existence,
    encoding, columns), ``data.data_dir``, ``model.name``/``data.tokenizer`` paths, ``devices.profiles``,
    and the run directory ``out_dir`` (``--out``). Raises :class:`ConfigError` naming the key or file."""
    from hfl_jax.data.tasks import DataError, DataNotFoundError, check_custom_files, custom_spec

    if cfg.data.data_dir is not None:
        _require(Path(cfg.data.data_dir).is_dir(), "data.data_dir", f"directory {cfg.data.data_dir} does not exist")
    if cfg.data.task == "custom":
        spec = custom_spec(cfg.data.custom)
        for split in ("train", "validation"):
            try:
                check_custom_files(spec, split)
            except (DataError, DataNotFoundError) as e:
                raise ConfigError(f"data.custom.{split}: {str(e).splitlines()[0]}") from None
    if cfg.data.task == "instruct":
        from hfl_jax.data.instruct import instruct_spec, load_instruct
        for split in ("train", "validation"):
            path = cfg.data.instruct.get(split)
            _require(path is None or Path(path).is_file(), f"data.instruct.{split}", f"file {path} does not exist")
            if path is not None:   # the fields and rows, before any model or tokenizer is loaded
                try:
                    load_instruct(instruct_spec(cfg.data.instruct), split)
                except (DataError, DataNotFoundError) as e:
                    raise ConfigError(f"data.instruct.{split}: {str(e).splitlines()[0]}") from None
    if cfg.data.tokenizer is not None:
        check_model_name(cfg.data.tokenizer, "data.tokenizer")
    _check_profiles(cfg)
    if out_dir is not None:
        _check_out(Path(out_dir))
    return cfg


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Keys holding file or directory paths; relative ones are resolved against the config file's directory.
PATH_KEYS = (("data", "data_dir"), ("devices", "profiles"), ("data", "custom", "train"),
             ("data", "custom", "validation"), ("data", "instruct", "train"), ("data", "instruct", "validation"))
# Keys that are a path only when they look like one (else an alias or a hub id).
MAYBE_PATH_KEYS = (("model", "name"), ("data", "tokenizer"))


def _looks_like_path(value: str, base: Path) -> bool:
    return value.startswith((".", "/", "~")) or (base / value).exists()


def _resolve_path(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value:
        p = Path(value).expanduser()
        return os.path.normpath(p if p.is_absolute() else (base / p).absolute())
    if isinstance(value, list):
        return [_resolve_path(v, base) for v in value]
    return value


def resolve_paths(raw: dict, base: Path) -> dict:
    """A copy of config dict ``raw`` with its relative paths (:data:`PATH_KEYS`, and
    :data:`MAYBE_PATH_KEYS` when they look like a path) made absolute against ``base``."""
    import copy

    raw = copy.deepcopy(raw)
    for keys, always in [(k, True) for k in PATH_KEYS] + [(k, False) for k in MAYBE_PATH_KEYS]:
        node = parent_node(raw, keys)
        if node is None or node.get(keys[-1]) is None:
            continue
        value = node[keys[-1]]
        if always or (isinstance(value, str) and _looks_like_path(value, base)):
            node[keys[-1]] = _resolve_path(value, base)
    return raw


def read_yaml(path: str | Path, _seen: tuple = (), resolve: bool = True) -> dict:
    """A config file as a dict. A top-level ``base: other.yaml`` (relative to this file) is loaded
    first and this file's keys are deep-merged over it. With ``resolve``, relative paths in each
    file (:data:`PATH_KEYS`) are resolved against that file's directory, as ``base`` is."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'base'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if resolve:
        raw = resolve_paths(raw, path.parent)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    if not (path.parent / base).is_file():
        raise ConfigError(f"{path}: base file {path.parent / base} does not exist")
    return _deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),), resolve), raw)


def read_run_dict(run_dir: str | Path) -> dict:
    """A run directory's ``config.yaml`` as written (absolute paths, older runs cwd-relative), with
    :data:`RUN_LEGACY_DEFAULTS` filled: what the run ran with."""
    return fill_run_legacy(read_yaml(Path(run_dir) / "config.yaml", resolve=False))


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The validated config a run directory was written with (:func:`read_run_dict`)."""
    return load_config(data=read_run_dict(run_dir))


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None,
                check_model: bool = True, paths_from_file: bool = True) -> ExperimentConfig:
    """YAML file (and/or dict) + dotted overrides -> validated :class:`ExperimentConfig`.

    Relative paths in the file resolve against the file's directory (``paths_from_file=False``:
    against the working directory, as run directories written before this rule need); those in
    ``data`` and ``overrides`` against the working directory. The result holds absolute paths."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path, resolve=paths_from_file)
    if data:
        raw = {**raw, **data}
    raw = resolve_paths(apply_overrides(raw, list(overrides)), Path.cwd())
    cfg = derive_defaults(from_dict(ExperimentConfig, raw))
    return validate(cfg, model_num_layers(cfg) if check_model else None)


def derive_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the defaults that depend on other keys filled in, so a run directory's
    ``config.yaml`` records what ran: ``algorithm.{hetlora,flexlora}.ranks`` null -> derived from
    ``lora.rank`` (:func:`hfl_jax.algos.hetlora.default_ranks`). Explicit values are kept as given."""
    from hfl_jax.algos.hetlora import default_ranks

    a, derived = cfg.algorithm, default_ranks(cfg.lora.rank)
    if a.hetlora.ranks is None:
        a = dataclasses.replace(a, hetlora=dataclasses.replace(a.hetlora, ranks=derived))
    if a.flexlora.ranks is None:
        a = dataclasses.replace(a, flexlora=dataclasses.replace(a.flexlora, ranks=derived))
    return cfg if a is cfg.algorithm else dataclasses.replace(cfg, algorithm=a)
