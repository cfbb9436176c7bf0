"""Simulated edge-device profiles for system heterogeneity (host-side, numpy).

HierFedLoRA (arXiv 2503.21213) runs on a testbed of NVIDIA Jetson boards in
different power modes, so devices differ in compute speed, memory and link
bandwidth. Here a device is a frozen `DeviceProfile`; named tiers model the
Jetson boards used by papers of this line (TX2, Xavier NX, AGX Xavier, AGX
Orin). `timemodel.py` turns a profile plus a workload into seconds and bytes.

Every default number below states its source or assumption; see also
docs/time_model.md. Units: FLOP/s, bytes/s, bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GiB = 1024**3
MB = 1e6  # link speeds are quoted in decimal megabytes per second

# Fraction of the FP32 spec-sheet peak that small-batch transformer training
# sustains on a Jetson (assumption: memory-bound kernels, PyTorch/XLA
# overheads; desktop GPUs typically reach 30-50 % MFU, embedded boards less).
SUSTAINED_UTILISATION = 0.3
# RAM kept by Linux for Tegra, the desktop and the CUDA context (assumption).
OS_RESERVED = 2 * GiB

PROFILE_FIELDS = ("name", "flops", "up_bw", "down_bw", "memory")
NUMERIC_FIELDS = ("flops", "up_bw", "down_bw", "memory")
# Optional fields: the device's own path to the cloud (WAN), used by algorithms whose devices
# talk to the cloud directly (FedLoRA, HetLoRA, ...). Absent: CLOUD_LINK_FRACTION x the LAN link.
OPTIONAL_FIELDS = ("cloud_up_bw", "cloud_down_bw")
# Assumption: a device-cloud path (access network + WAN to a cloud region) sustains a quarter of the
# device's link to a nearby edge server (hierarchical-FL papers, e.g. Liu et al., "Client-Edge-Cloud
# Hierarchical Federated Learning", ICC 2020, model cloud links as several times slower than edge links).
CLOUD_LINK_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One simulated device.

    Attributes:
        name: tier or device name, e.g. "tx2".
        flops: sustained training throughput in FLOP/s (float32).
        up_bw: uplink bandwidth, bytes/s (device -> edge server, the LAN tier).
        down_bw: downlink bandwidth, bytes/s (edge server -> device).
        memory: memory available for training, bytes.
        cloud_up_bw, cloud_down_bw: the device's direct path to the cloud (WAN), bytes/s;
            None: ``CLOUD_LINK_FRACTION`` x ``up_bw`` / ``down_bw``.
    """

    name: str
    flops: float
    up_bw: float
    down_bw: float
    memory: float
    cloud_up_bw: float | None = None
    cloud_down_bw: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceProfile.name must be a non-empty string, got {self.name!r}")
        for field in NUMERIC_FIELDS:
            raw = getattr(self, field)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"DeviceProfile {self.name!r}: {field}={raw!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"DeviceProfile {self.name!r}: {field} must be positive and finite, got {raw!r}")
            object.__setattr__(self, field, value)
        for field, lan in zip(OPTIONAL_FIELDS, ("up_bw", "down_bw")):
            if getattr(self, field) is None:
                object.__setattr__(self, field, CLOUD_LINK_FRACTION * getattr(self, lan))
        for field in OPTIONAL_FIELDS:
            value = float(getattr(self, field))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"DeviceProfile {self.name!r}: {field} must be positive and finite, "
                                 f"got {getattr(self, field)!r}")
            object.__setattr__(self, field, value)


def _tier(name: str, fp32_peak_tflops: float, ram_gib: float, up_mb_s: float, down_mb_s: float) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        flops=fp32_peak_tflops * 1e12 * SUSTAINED_UTILISATION,
        up_bw=up_mb_s * MB,
        down_bw=down_mb_s * MB,
        memory=ram_gib * GiB - OS_RESERVED,
    )


# FP32 peak = CUDA cores x 2 (FMA) x max GPU clock, from NVIDIA's Jetson
# module data sheets. Links are assumed Wi-Fi tiers (1-20 MB/s band used by
# FL testbed papers); the uplink is assumed half the downlink.
TIERS: dict[str, DeviceProfile] = {
    # Jetson TX2: 256 Pascal cores @ 1.30 GHz -> 0.67 TFLOPS FP32
    # (NVIDIA's "1.33 TFLOPS" is FP16); 8 GiB LPDDR4. Link: 2 / 4 MB/s.
    "tx2": _tier("tx2", 0.67, 8, up_mb_s=2, down_mb_s=4),
    # Jetson Xavier NX: 384 Volta cores @ 1.10 GHz -> 0.85 TFLOPS FP32;
    # 8 GiB LPDDR4x (the 16 GiB module is not modelled). Link: 4 / 8 MB/s.
    "nx": _tier("nx", 0.85, 8, up_mb_s=4, down_mb_s=8),
    # Jetson AGX Xavier: 512 Volta cores @ 1.377 GHz -> 1.41 TFLOPS FP32;
    # 32 GiB LPDDR4x. Link: 6 / 12 MB/s.
    "agx": _tier("agx", 1.41, 32, up_mb_s=6, down_mb_s=12),
    # Jetson AGX Orin 64GB: 2048 Ampere cores @ 1.30 GHz -> 5.32 TFLOPS FP32;
    # 64 GiB LPDDR5. Link: 8 / 16 MB/s.
    "orin": _tier("orin", 5.32, 64, up_mb_s=8, down_mb_s=16),
}

DEFAULT_TIERS = ("tx2", "nx", "agx", "orin")


def _lookup(name: str, table: Mapping[str, DeviceProfile]) -> DeviceProfile:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown device tier {name!r}; known tiers: {sorted(table)}") from None


def _tier_weights(tiers: Sequence[str] | Mapping[str, float], table) -> tuple[list[str], np.ndarray]:
    if isinstance(tiers, str):
        tiers = (tiers,)
    if isinstance(tiers, Mapping):
        names = list(tiers)
        weights = np.asarray([float(tiers[n]) for n in names], dtype=np.float64)
    else:
        names = list(tiers)
        weights = np.ones(len(names), dtype=np.float64)
    if not names:
        raise ValueError("draw_profiles needs at least one tier")
    for n in names:
        _lookup(n, table)
    if np.any(~np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"tier weights must be non-negative with a positive sum, got {dict(zip(names, weights))}")
    return names, weights / weights.sum()


def draw_profiles(
        num_devices: int,
        tiers: Sequence[str] | Mapping[str, float] = DEFAULT_TIERS,
        seed: int = 0,
        bandwidth_jitter: float = 0.5,
        tier_table: Mapping[str, DeviceProfile] | None = None,
) -> list[DeviceProfile]:
    """Draws `num_devices` device profiles, deterministically for a seed.

    Each device picks a tier i.i.d. (uniform over `tiers` if a sequence, or
    with the given mixture weights if a mapping), then its up- and downlink
    bandwidths are each multiplied by an independent factor
    U(1 - bandwidth_jitter, 1 + bandwidth_jitter) to model distance to the
    access point. Compute and memory are the tier's.

    Args:
        num_devices: N >= 0.
        tiers: tier names, or {tier name: weight}.
        seed: numpy seed; equal seeds give equal lists.
        bandwidth_jitter: in [0, 1).
        tier_table: tier definitions; defaults to `TIERS`.

    Returns:
        list of N `DeviceProfile`s named after their tier.
    """
    table = TIERS if tier_table is None else tier_table
    if int(num_devices) != num_devices or num_devices < 0:
        raise ValueError(f"num_devices must be a non-negative integer, got {num_devices!r}")
    if not 0.0 <= bandwidth_jitter < 1.0:
        raise ValueError(f"bandwidth_jitter must be in [0, 1), got {bandwidth_jitter!r}")
    names, probs = _tier_weights(tiers, table)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(names), size=int(num_devices), p=probs)
    jitter = rng.uniform(1.0 - bandwidth_jitter, 1.0 + bandwidth_jitter, size=(int(num_devices), 2))
    out = []
    for i, k in enumerate(picks):
        base = _lookup(names[k], table)
        out.append(dataclasses.replace(base, up_bw=base.up_bw * jitter[i, 0], down_bw=base.down_bw * jitter[i, 1],
                                       cloud_up_bw=base.cloud_up_bw * jitter[i, 0],
                                       cloud_down_bw=base.cloud_down_bw * jitter[i, 1]))
    return out


def profiles_to_arrays(profiles: Sequence[DeviceProfile]) -> dict[str, np.ndarray]:
    """Stacks profiles into arrays for vectorised time models.

    Returns:
        {"name": str [N], "flops", "up_bw", "down_bw", "memory", "cloud_up_bw", "cloud_down_bw": float64 [N]}.
    """
    out = {"name": np.asarray([p.name for p in profiles], dtype=str)}
    for field in NUMERIC_FIELDS + OPTIONAL_FIELDS:
        out[field] = np.asarray([getattr(p, field) for p in profiles], dtype=np.float64)
    return out


def _from_fields(row: Mapping[str, Any], table: Mapping[str, DeviceProfile], where: str) -> DeviceProfile:
    """A profile from a full row, or from a tier (`tier` or known `name`) plus overrides."""
    row = dict(row)
    unknown = set(row) - set(PROFILE_FIELDS) - set(OPTIONAL_FIELDS) - {"tier", "count"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {PROFILE_FIELDS} (+ tier, count)")
    tier = row.pop("tier", None)
    row.pop("count", None)
    if tier is None and row.get("name") in table and not set(PROFILE_FIELDS) <= set(row):
        tier = row["name"]
    if tier is not None:
        base = dataclasses.asdict(_lookup(str(tier), table))
        base.update(row)
        row = base
    missing = [f for f in PROFILE_FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}; expected {PROFILE_FIELDS}")
    try:
        return DeviceProfile(**{k: (str(v) if k == "name" else v) for k, v in row.items()})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _load_yaml(path: str) -> list[DeviceProfile]:
    import yaml  # only needed for YAML files

    with open(path) as f:
        data = yaml.safe_load(f)
    table = dict(TIERS)
    if isinstance(data, Mapping):
        # {tiers: {name: fields or overrides}, counts: {name: n}}
        extra = set(data) - {"tiers", "counts"}
        if extra or "counts" not in data:
            raise ValueError(f"{path}: a YAML mapping needs 'counts' (and optional 'tiers'), got keys {sorted(data)}")
        for name, fields in (data.get("tiers") or {}).items():
            table[str(name)] = _from_fields({"name": str(name), **(fields or {})}, table, f"{path}: tier {name!r}")
        out = []
        for name, n in data["counts"].items():
            if int(n) != n or n < 0:
                raise ValueError(f"{path}: count for {name!r} must be a non-negative integer, got {n!r}")
            out += [_lookup(str(name), table)] * int(n)
        return out
    if isinstance(data, list):
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise ValueError(f"{path}: entry {i} must be a mapping, got {row!r}")
            n = row.get("count", 1)
            if int(n) != n or n < 0:
                raise ValueError(f"{path}: entry {i}: count must be a non-negative integer, got {n!r}")
            out += [_from_fields(row, table, f"{path}: entry {i}")] * int(n)
        return out
    raise ValueError(f"{path}: expected a list of profiles or a mapping with 'counts', got {type(data).__name__}")


def _load_csv(path: str) -> list[DeviceProfile]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in PROFILE_FIELDS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing CSV columns {missing}; header must be {','.join(PROFILE_FIELDS)}")
        out = []
        for i, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                out.append(DeviceProfile(**{k: row[k] for k in PROFILE_FIELDS + OPTIONAL_FIELDS if row.get(k, "") != ""}))
            except ValueError as e:
                raise ValueError(f"{path}: line {i}: {e}") from None
        return out


def load_profiles(path: str | os.PathLike) -> list[DeviceProfile]:
    """Loads device profiles from a YAML or CSV file.

    YAML: either a list of entries, each a full profile
    (name, flops, up_bw, down_bw, memory) or `{tier: <built-in>, count: n,
    <overrides>}`; or a mapping `{tiers: {name: fields}, counts: {name: n}}`
    where `tiers` defines new tiers or overrides built-in ones. CSV: header
    `name,flops,up_bw,down_bw,memory`, one device per row. Units: FLOP/s,
    bytes/s, bytes.

    Returns:
        list of `DeviceProfile`, in file order.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        return _load_yaml(path)
    if ext == ".csv":
        return _load_csv(path)
    raise ValueError(f"{path}: unsupported profile file type {ext!r}; use .yaml, .yml or .csv")
