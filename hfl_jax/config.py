"""Typed, frozen experiment configuration loaded from YAML with dotted overrides.

``load_config(path, overrides)`` maps a YAML file onto :class:`ExperimentConfig`;
an unknown key, a wrong type or an impossible value raises :class:`ConfigError`
naming the key (e.g. ``train.rounds``) before any work starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml


class ConfigError(ValueError):
    """An invalid experiment configuration; the message names the key."""


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """A small random BERT encoder (for smoke tests; no download)."""
    hidden_size: int = 32
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 64
    vocab_size: int = 30522  # matches the packaged MiniLM tokenizer


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm-l6"             # alias, local directory, hub id, or "tiny" (random, see `tiny`)
    tiny: TinyModelConfig = TinyModelConfig()
    compute_dtype: str = "float32"      # float32 | bfloat16 (mixed precision: hfl_jax/models/precision.py)
    attention: str = "auto"             # auto | xla | cudnn | einsum (BERT/RoBERTa attention kernel)
    remat: str = "none"                 # none | dots | dense | full (hfl_jax/models/precision.py)


@dataclasses.dataclass(frozen=True)
class LoRASection:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "sst2"                  # sst2 | qnli | qqp | mnli | custom
    data_dir: Optional[str] = None      # GLUE-layout directory; default $HFL_DATA_DIR, then the hub
    tokenizer: Optional[str] = None     # default: model.name ("minilm-l6" for model.name == "tiny")
    max_length: int = 64
    train_subset: Optional[int] = None  # use a seeded random subset of this many training examples
    eval_subset: Optional[int] = None
    custom: Optional[dict] = None       # CustomSpec fields for task == custom
    # Exact speed-up: each group's device data (and the eval set) is cut to the smallest length
    # bucket >= its longest real sequence (trailing all-padding columns only; results unchanged up
    # to float reordering). Groups may then differ in T: one compilation per (depth, T).
    trim_padding: bool = True
    length_multiple: int = 8            # buckets: multiples of this ...
    length_buckets: Optional[tuple[int, ...]] = None   # ... or exactly these lengths (overrides)


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
    edge_cloud_bandwidth: float = 100e6  # bytes/s between a group's aggregator and the cloud


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rounds: int = 20                    # global rounds
    local_steps: int = 5                # E
    batch_size: int = 16                # B per device
    optimizer: str = "adamw"            # adamw | adam | sgd
    lr: float = 5e-4
    weight_decay: float = 0.0
    eval_every: int = 1
    eval_batch_size: int = 128
    target_accuracy: Optional[float] = None   # stop once reached
    time_budget: Optional[float] = None       # stop once the simulated clock passes this (s)
    participation: float = 1.0          # fraction of each group's devices sampled per round
    availability: float = 1.0           # probability that a sampled device is available
    chunk_size: Optional[int] = None    # max simulated devices vmapped at once
    shard: bool = True                  # shard the device axis over all local accelerators
    # Compute the output of the bottom L - max(arm depths) layers once per example at setup and
    # train/probe/evaluate from it. Exact while those layers' LoRA is never trained (refused when
    # an arm has depth L). Memory: 4 * T * H bytes per training and eval example.
    cache_frozen_layers: bool = False


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    phi: float = 0.5
    gamma: float = 0.95
    nu: float = 0.5
    time_budget: Optional[float] = None   # per-global-round simulated time budget (s); None = none


@dataclasses.dataclass(frozen=True)
class HetLoRAConfig:
    ranks: tuple[int, ...] = (2, 4, 8)  # ranks by device capability tercile (slow -> fast)
    prune_factor: float = 0.5           # rank self-pruning: r <- max(min_rank, floor(r * factor))
    prune_threshold: float = 0.05       # ... when ||pruned part|| / ||kept part|| is below this
    min_rank: int = 1
    sparsity: str = "update"            # aggregation weights x samples: "update" ||A'B' - AB||_F (the round's
                                        # change), "adapter" ||A'B'||_F, "none" (sample counts only)


HETLORA_SPARSITY = ("update", "adapter", "none")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "hierfedlora"           # hierfedlora | fedlora | hetlora | hierfedlora_random_groups |
                                        # hierfedlora_fixed | hierfedlora_full_depth
    num_groups: int = 4
    lam: float = 0.0                    # grouping: weight of the speed-spread term
    depths: Optional[tuple[int, ...]] = None   # depth grid (None: 1, 2, 4, ... up to L, and L)
    taus: tuple[int, ...] = (1, 2, 3)   # intra-group aggregation frequencies
    fixed_depth: Optional[int] = None   # hierfedlora_fixed (None: L // 2)
    fixed_tau: int = 1
    bandit: BanditConfig = BanditConfig()
    hetlora: HetLoRAConfig = HetLoRAConfig()


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
    checkpoint: CheckpointConfig = CheckpointConfig()
    tensorboard: bool = False


ALGORITHMS = ("hierfedlora", "fedlora", "hetlora", "hierfedlora_random_groups", "hierfedlora_fixed",
              "hierfedlora_full_depth")


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
    """Checks values that types cannot (ranges, cross-field rules). ``num_layers`` adds depth checks."""
    t, p, a, l = cfg.train, cfg.partition, cfg.algorithm, cfg.lora
    _require(cfg.name.strip() != "", "name", "must not be empty")
    for key, v in [("train.rounds", t.rounds), ("train.local_steps", t.local_steps),
                   ("train.batch_size", t.batch_size), ("train.eval_every", t.eval_every),
                   ("train.eval_batch_size", t.eval_batch_size), ("partition.num_devices", p.num_devices),
                   ("algorithm.num_groups", a.num_groups), ("lora.rank", l.rank),
                   ("data.max_length", cfg.data.max_length), ("checkpoint.every", cfg.checkpoint.every),
                   ("checkpoint.keep", cfg.checkpoint.keep), ("algorithm.fixed_tau", a.fixed_tau)]:
        _require(v >= 1, key, f"must be >= 1, got {v}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(t.time_budget is None or t.time_budget > 0, "train.time_budget", "must be > 0 (seconds)")
    for key, v in [("data.train_subset", cfg.data.train_subset), ("data.eval_subset", cfg.data.eval_subset)]:
        _require(v is None or v >= 1, key, f"must be >= 1, got {v}")
    _require(p.min_samples >= 0, "partition.min_samples", f"must be >= 0, got {p.min_samples}")
    _require(p.classes_per_device >= 1, "partition.classes_per_device", "must be >= 1")
    _require(p.beta > 0, "partition.beta", f"must be > 0, got {p.beta}")
    _require(cfg.devices.edge_cloud_bandwidth > 0, "devices.edge_cloud_bandwidth", "must be > 0 (bytes/s)")
    _require(0 <= cfg.devices.bandwidth_jitter < 1, "devices.bandwidth_jitter", "must be in [0, 1)")
    _require(a.bandit.time_budget is None or a.bandit.time_budget > 0, "algorithm.bandit.time_budget",
             "must be > 0 (seconds)")
    _require(l.alpha > 0, "lora.alpha", f"must be > 0, got {l.alpha}")
    _require(t.optimizer in ("adamw", "adam", "sgd"), "train.optimizer", f"unknown optimizer {t.optimizer!r}")
    _require(0 < t.participation <= 1, "train.participation", f"must be in (0, 1], got {t.participation}")
    _require(0 < t.availability <= 1, "train.availability", f"must be in (0, 1], got {t.availability}")
    _require(t.chunk_size is None or t.chunk_size >= 1, "train.chunk_size", "must be >= 1")
    _require(cfg.data.length_multiple >= 1, "data.length_multiple", "must be >= 1")
    _require(cfg.data.length_buckets is None or (len(cfg.data.length_buckets) > 0
                                                  and min(cfg.data.length_buckets) >= 1),
             "data.length_buckets", "must be a non-empty list of ints >= 1")
    _require(a.name in ALGORITHMS, "algorithm.name", f"unknown algorithm {a.name!r}; one of {', '.join(ALGORITHMS)}")
    _require(a.num_groups <= p.num_devices, "algorithm.num_groups",
             f"{a.num_groups} groups exceed partition.num_devices={p.num_devices}")
    _require(a.lam >= 0, "algorithm.lam", "must be >= 0")
    _require(len(a.taus) > 0 and min(a.taus) >= 1, "algorithm.taus", f"must be a non-empty list of ints >= 1")
    _require(p.method in ("iid", "dirichlet", "pathological", "quantity"), "partition.method",
             f"unknown partition method {p.method!r}")
    _require(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")
    _require(cfg.model.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype", "float32 or bfloat16")
    _require(cfg.model.attention in ("auto", "xla", "cudnn", "einsum"), "model.attention",
             f"one of auto, xla, cudnn, einsum; got {cfg.model.attention!r}")
    _require(cfg.model.remat in ("none", "dots", "dense", "full"), "model.remat",
             f"one of none, dots, dense, full; got {cfg.model.remat!r}")
    b = a.bandit
    _require(0 < b.gamma <= 1, "algorithm.bandit.gamma", f"must be in (0, 1], got {b.gamma}")
    _require(b.phi >= 0 and b.nu >= 0, "algorithm.bandit", "phi and nu must be >= 0")
    h = a.hetlora
    if a.name == "hetlora":
        _require(len(h.ranks) > 0 and min(h.ranks) >= 1 and max(h.ranks) <= l.rank, "algorithm.hetlora.ranks",
                 f"must be ints in [1, lora.rank={l.rank}], got {list(h.ranks)}")
    _require(0 < h.prune_factor < 1, "algorithm.hetlora.prune_factor", "must be in (0, 1)")
    _require(h.min_rank >= 1, "algorithm.hetlora.min_rank", f"must be >= 1, got {h.min_rank}")
    _require(h.prune_threshold >= 0, "algorithm.hetlora.prune_threshold", "must be >= 0")
    _require(h.sparsity in HETLORA_SPARSITY, "algorithm.hetlora.sparsity",
             f"must be one of {', '.join(HETLORA_SPARSITY)}, got {h.sparsity!r}")
    if t.target_accuracy is not None:
        _require(0 < t.target_accuracy <= 1, "train.target_accuracy", "must be in (0, 1]")
    if num_layers is not None:
        for d in a.depths or ():
            _require(1 <= d <= num_layers, "algorithm.depths",
                     f"depth {d} is outside [1, {num_layers}] (the model has {num_layers} layers)")
        if a.fixed_depth is not None:
            _require(1 <= a.fixed_depth <= num_layers, "algorithm.fixed_depth",
                     f"depth {a.fixed_depth} is outside [1, {num_layers}] (the model has {num_layers} layers)")
    return cfg


# Layer counts of common checkpoints, so configs are validated offline before any download.
KNOWN_LAYERS = {
    "roberta-base": 12, "FacebookAI/roberta-base": 12, "roberta-large": 24, "FacebookAI/roberta-large": 24,
    "bert-base-uncased": 12, "google-bert/bert-base-uncased": 12,
    "microsoft/deberta-base": 12, "microsoft/deberta-large": 24,
    "microsoft/deberta-v3-base": 12, "microsoft/deberta-v3-large": 24,
}


def model_num_layers(cfg: ExperimentConfig) -> int | None:
    """Layer count from the model's config.json without loading weights (None if unreachable)."""
    import json

    if cfg.model.name == "tiny":
        return cfg.model.tiny.num_layers
    if cfg.model.name in KNOWN_LAYERS:
        return KNOWN_LAYERS[cfg.model.name]
    try:
        from hfl_jax.models.hub import resolve_model_dir
        return int(json.loads((resolve_model_dir(cfg.model.name) / "config.json").read_text())["num_hidden_layers"])
    except Exception:
        return None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A config file as a dict. A top-level ``base: other.yaml`` (relative to this file) is loaded
    first and this file's keys are deep-merged over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'base'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), raw)


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None,
                check_model: bool = True) -> ExperimentConfig:
    """YAML file (and/or dict) + dotted overrides -> validated :class:`ExperimentConfig`."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    if data:
        raw = {**raw, **data}
    raw = apply_overrides(raw, list(overrides))
    cfg = from_dict(ExperimentConfig, raw)
    return validate(cfg, model_num_layers(cfg) if check_model else None)
