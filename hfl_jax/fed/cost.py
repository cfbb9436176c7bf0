"""The cost model of one group round: simulated seconds, bytes, and which arms fit the budgets.

Built on :mod:`hfl_jax.fed.timemodel` (per-device compute and link times) and
memory and time budgets (:func:`feasible_arms`). A :class:`Workload` holds
the few numbers the cost model needs; the device profiles and the model config
come from the run's environment. Formulas: ``docs/time_model.md``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hfl_jax.fed import timemodel


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one device does per intra-group round and what crosses the links."""
    local_steps: int                   # E
    batch_size: int                    # B
    seq_len: int                       # T (the configured max length)
    rank: int                          # the global adapters' rank
    targets: tuple                     # adapted projections
    edge_cloud_bandwidth: float        # bytes/s between a group's edge server and the cloud (each way)
    edge_latency: float = 0.0          # s per message on a device-edge link
    cloud_latency: float = 0.0         # s per message on any path that reaches the cloud
    two_tier: bool = False             # flat algorithms' devices use their cloud (WAN) links; else their LAN
    hierarchical: bool = True          # groups aggregate at an edge node, then the cloud (hop counted)
    probe: bool = False                # a bandit probe: 2 forward passes + 1 download per device per round
    factors: str = "AB"                # LoRA factors exchanged ("A", "B" or both; see timemodel.lora_bytes)
    layer_policy: str = "top"          # which d layers a depth trains (algorithm.layer_policy; models.lora.layer_mask)


def per_rank(fn, ranks: np.ndarray) -> np.ndarray:
    """Evaluates ``fn(rank) -> [n]`` once per distinct rank and scatters the results."""
    out = np.zeros(len(ranks))
    for r in np.unique(ranks):
        sel = ranks == r
        out[sel] = np.broadcast_to(np.asarray(fn(int(r)), np.float64), ranks.shape)[sel]
    return out


def _critical_compute(compute: np.ndarray, total: np.ndarray) -> float:
    """Compute seconds of the slowest device (the one that sets the intra-round's ``total`` time)."""
    return float(compute[int(np.argmax(total))]) if compute.size else 0.0


def group_cost(model_cfg, profiles: dict, work: Workload, ids: np.ndarray, ranks: np.ndarray, depth: int,
               tau: int) -> dict:
    """Simulated seconds and bytes of one group's round for its present devices ``ids``, per tier.

    Devices download every layer's adapters at the first intra-group round (the other layers
    may have changed globally) and only their ``depth`` trained layers afterwards (the top ones
    under ``work.layer_policy`` ``top``); they upload their trained layers plus the head each
    time, and compute as :func:`~hfl_jax.fed.timemodel.step_flops` says for the policy (the
    backward pass down to the lowest trained layer). A bandit that probes also pays for it: two
    forward passes of one batch per device, and one more download of the group model's
    ``depth`` trained layers plus the head (spread over the ``tau`` intra-rounds).

    Tiers: a hierarchical algorithm's devices talk to their group's edge server (``up_bw`` /
    ``down_bw``, ``edge_latency`` per message), and the edge server exchanges the group model
    with the cloud (``edge_cloud_bandwidth``, ``cloud_latency``). A flat algorithm's devices
    talk to the cloud directly: with ``two_tier`` over their cloud links (``cloud_up_bw`` /
    ``cloud_down_bw``, ``cloud_latency``), else over ``up_bw`` / ``down_bw`` with no latency
    (the single-tier model of earlier versions). Each intra-round lasts as long as its slowest
    device; ``time = time_compute + time_edge + time_cloud`` splits that critical path.

    Args:
      model_cfg: the encoder's config; profiles: DeviceProfile arrays ``[N]``.
      ids: ``[n]`` present device ids; ranks: ``[n]`` their LoRA ranks.
    Returns:
      ``{"time", "time_compute", "time_edge", "time_cloud": s, "bytes_up", "bytes_down": B (all
      tiers), "edge_bytes_up", "edge_bytes_down", "cloud_bytes_up", "cloud_bytes_down": B}``.
    """
    cfg, L = model_cfg, model_cfg.num_layers
    prof = {k: v[ids] for k, v in profiles.items() if k != "name"}
    lora_bytes = lambda layers, r: timemodel.lora_bytes(cfg, layers, r, work.targets, factors=work.factors)
    head = timemodel.head_bytes(cfg)
    kw = dict(local_steps=work.local_steps, batch_size=work.batch_size, seq_len=work.seq_len,
              depth=depth, targets=work.targets, factors=work.factors, policy=work.layer_policy)
    cloud_direct = not work.hierarchical and work.two_tier
    if cloud_direct:  # the time model reads up_bw / down_bw: give it the cloud links
        prof = dict(prof, up_bw=prof["cloud_up_bw"], down_bw=prof["cloud_down_bw"])
    latency = (work.cloud_latency if cloud_direct else work.edge_latency) if work.two_tier else 0.0
    compute = per_rank(lambda r: work.local_steps * timemodel.step_flops(
        cfg, work.batch_size, work.seq_len, depth, r, work.targets, policy=work.layer_policy), ranks) / prof["flops"]
    first = per_rank(lambda r: timemodel.device_round_time(cfg, prof, rank=r, down_layers=L, **kw), ranks)
    later = per_rank(lambda r: timemodel.device_round_time(cfg, prof, rank=r, down_layers=depth, **kw), ranks)
    if latency:
        first, later = first + 2 * latency, later + 2 * latency
    up_d = per_rank(lambda r: lora_bytes(depth, r) + head, ranks)
    down_total = per_rank(lambda r: lora_bytes(L, r) + head, ranks).sum() + (tau - 1) * up_d.sum()
    if work.probe:
        fwd = timemodel.forward_flops(cfg, work.batch_size, work.seq_len, work.rank, work.targets)
        later = later + 2 * fwd / prof["flops"] / tau + up_d / prof["down_bw"] / tau
        first = first + (2 * fwd / prof["flops"] + up_d / prof["down_bw"]) / tau
        compute = compute + 2 * fwd / prof["flops"] / tau
        down_total = down_total + up_d.sum()
    time = timemodel.group_round_time(first) + (tau - 1) * timemodel.group_round_time(later)
    t_compute = _critical_compute(compute, first) + (tau - 1) * _critical_compute(compute, later)
    t_link = time - t_compute
    up_total = tau * up_d.sum()
    out = {"time_compute": t_compute, "edge_bytes_up": 0.0, "edge_bytes_down": 0.0}
    if work.hierarchical:
        g_up = lora_bytes(depth, work.rank) + head
        g_down = lora_bytes(L, work.rank) + head
        hop = (g_up + g_down) / work.edge_cloud_bandwidth + (2 * work.cloud_latency if work.two_tier else 0.0)
        time += hop
        out.update(time_edge=t_link, time_cloud=hop, edge_bytes_up=float(up_total), edge_bytes_down=float(down_total),
                   cloud_bytes_up=float(g_up), cloud_bytes_down=float(g_down))
    else:
        out.update(time_edge=0.0, time_cloud=t_link, cloud_bytes_up=float(up_total), cloud_bytes_down=float(down_total))
    out["time"] = time
    out["bytes_up"] = out["edge_bytes_up"] + out["cloud_bytes_up"]
    out["bytes_down"] = out["edge_bytes_down"] + out["cloud_bytes_down"]
    return out


def feasible_arms(arm_depths: np.ndarray, arm_taus: np.ndarray, memory, time,
                                    mem_budget: float | None,
                                    time_budget: float | None) -> np.ndarray:
    """Which arms fit the group's budgets.

    Args:
        arm_depths: [A] LoRA depth of each arm.
        arm_taus: [A] intra-group rounds of each arm.
        memory: [A] array of memory needs, or ``fn(depth, tau) -> memory``.
        time: [A] array of (simulated) round times, or ``fn(depth, tau) -> time``.
        mem_budget: memory budget (None = unconstrained).
        time_budget: time budget (None = unconstrained).

    Returns:
        bool [A]: memory <= mem_budget and time <= time_budget.
    """
    d = np.asarray(arm_depths)
    t = np.asarray(arm_taus)
    if d.shape != t.shape or d.ndim != 1:
        raise ValueError(f"arm_depths {d.shape} and arm_taus {t.shape} must be "
                         "1-D of equal length")

    def resolve(v, name):
        if callable(v):
            v = [v(int(di), int(ti)) for di, ti in zip(d, t)]
        v = np.asarray(v, np.float64)
        if v.shape != d.shape:
            raise ValueError(f"{name} must have shape {d.shape}, got {v.shape}")
        return v

    mem = resolve(memory, "memory")
    tim = resolve(time, "time")
    ok = np.ones(d.shape, bool)
    if mem_budget is not None:
        ok &= mem <= mem_budget
    if time_budget is not None:
        ok &= tim <= time_budget
    return ok


def arm_costs(model_cfg, profiles: dict, work: Workload, ids: np.ndarray, ranks: np.ndarray,
              arm_depths: np.ndarray, arm_taus: np.ndarray, time_budget: float | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """``([A] feasible, [A] estimated time)`` of every arm for the present devices ``ids``.

    An arm is infeasible if its memory (:func:`~hfl_jax.fed.timemodel.memory_needed` at the
    largest present rank) exceeds the smallest present device's memory, or its estimated
    round time exceeds ``time_budget`` (None: no time limit).
    """
    r = int(ranks.max())
    mem = [timemodel.memory_needed(model_cfg, work.batch_size, work.seq_len, int(d), r, work.targets,
                                   policy=work.layer_policy) for d in arm_depths]
    est = np.array([group_cost(model_cfg, profiles, work, ids, ranks, int(d), int(t))["time"]
                    for d, t in zip(arm_depths, arm_taus)])
    ok = feasible_arms(arm_depths, arm_taus, mem, est, float(profiles["memory"][ids].min()), time_budget)
    return ok, est
