"""One global round, shared by every algorithm (HierFedLoRA, ablations, FedLoRA, HetLoRA).

Per group ``k``: sample the participating devices, choose the arm ``(d_k, tau_k)``
(R-UCB or fixed), run ``tau_k`` intra-group rounds of ``E`` local steps at depth
``d_k`` (one compiled call each, :func:`hfl_jax.fed.engine.make_group_round`),
score progress on probe batches, and charge simulated time and traffic from
the time model. Then the cloud aggregates layer-wise over groups
(:func:`hfl_jax.fed.aggregate.layerwise_aggregate`) and the bandits learn.
Everything random is derived from ``(seed, round, group, intra-round, device id)``,
so a round is a pure function of ``(setup, state)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfl_jax.algos import hetlora as hetlora_lib
from hfl_jax.algos import rucb as rucb_lib
from hfl_jax.algos.spec import AlgoSpec
from hfl_jax.data import DeviceData
from hfl_jax.fed import timemodel
from hfl_jax.fed.aggregate import layerwise_aggregate
from hfl_jax.fed.device_axis import DeviceAxis
from hfl_jax.fed.engine import make_group_round, make_probe
from hfl_jax.models.encoder import EncoderModel

PROBE_SALT = 1_000_003  # fold-in constant separating probe keys from training keys
# Salts that give every purpose its own random stream (shared with hfl_jax.driver).
SALT_ROUNDS, SALT_PARTICIPATION, SALT_LORA_INIT = 1, 2, 3
SALT_PARTITION, SALT_PROFILES, SALT_GROUPS, SALT_SUBSET = 11, 12, 13, 14


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """Everything a round needs that does not change between rounds (rebuilt from the config on resume)."""
    model: EncoderModel
    base: Any                          # frozen parameters (no head), placed on the accelerators
    assignment: np.ndarray             # [N] group of each device
    group_slots: tuple                 # per group: [S] device ids, -1 for padding slots (S equal for all groups)
    group_data: tuple                  # per group: DeviceData with S slots, placed on the device axis
    counts: np.ndarray                 # [N] training examples per device
    profiles: dict                     # DeviceProfile arrays [N]: flops, up_bw, down_bw, memory
    spec: AlgoSpec
    arm_depths: np.ndarray             # [A]
    arm_taus: np.ndarray               # [A]
    optimizer: optax.GradientTransformation
    axis: DeviceAxis
    key: jax.Array                     # experiment key
    seed: int
    seq_len: int
    n_max: int
    local_steps: int
    batch_size: int
    rank: int
    targets: tuple
    participation: float
    availability: float
    bandit: Any                        # BanditConfig
    hetlora: Any                       # HetLoRAConfig
    edge_cloud_bandwidth: float

    @property
    def num_groups(self) -> int:
        return len(self.group_slots)


@dataclasses.dataclass(frozen=True)
class RunState:
    """Everything that changes between rounds (checkpointed)."""
    round: int
    trainable: Any                     # {"lora": LoRA, "head": ...} global model
    bandits: tuple                     # per group RUCBState
    reward_scale: np.ndarray           # [K] EMA (factor bandit.gamma) of |progress rate| per group (reward normaliser)
    ranks: np.ndarray                  # [N] LoRA rank of each device (HetLoRA; else all = lora.rank)
    sim_time: float                    # simulated seconds so far
    bytes_up: float                    # all levels, cumulative
    bytes_down: float


def bandit_of(setup: Setup):
    b = setup.bandit
    return rucb_lib.rucb(len(setup.arm_depths), phi=b.phi, gamma=b.gamma, nu=b.nu)


def sample_participation(num_devices: int, fraction: float, availability: float,
                         assignment: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[N]`` bool: per group, ``ceil(fraction * size)`` devices sampled without replacement,
    each then available with probability ``availability``."""
    out = np.zeros(num_devices, bool)
    for k in np.unique(assignment):
        members = np.flatnonzero(assignment == k)
        n = int(np.ceil(fraction * len(members)))
        out[rng.choice(members, size=n, replace=False)] = True
    if availability < 1.0:
        out &= rng.random(num_devices) < availability
    return out


def _per_rank(fn, ranks: np.ndarray) -> np.ndarray:
    """Evaluates ``fn(rank) -> [n]`` once per distinct rank and scatters the results."""
    out = np.zeros(len(ranks))
    for r in np.unique(ranks):
        sel = ranks == r
        out[sel] = np.broadcast_to(np.asarray(fn(int(r)), np.float64), ranks.shape)[sel]
    return out


def group_cost(setup: Setup, ids: np.ndarray, ranks: np.ndarray, depth: int, tau: int) -> dict:
    """Simulated seconds and bytes of one group's round for its present devices ``ids``.

    Devices download every layer's adapters at the first intra-group round (the bottom layers
    may have changed globally) and only their top ``depth`` layers afterwards; they upload their
    top ``depth`` layers plus the head each time. A hierarchical algorithm adds the edge-cloud hop.
    A bandit-driven algorithm also pays for its progress probe: two forward passes of one batch
    per device, and one more download of the group model's top ``depth`` layers plus the head.
    """
    cfg, L = setup.model.cfg, setup.model.num_layers
    prof = {k: v[ids] for k, v in setup.profiles.items() if k != "name"}
    kw = dict(local_steps=setup.local_steps, batch_size=setup.batch_size, seq_len=setup.seq_len,
              depth=depth, targets=setup.targets)
    first = _per_rank(lambda r: timemodel.device_round_time(cfg, prof, rank=r, down_layers=L, **kw), ranks)
    later = _per_rank(lambda r: timemodel.device_round_time(cfg, prof, rank=r, down_layers=depth, **kw), ranks)
    head = timemodel.head_bytes(cfg)
    up_d = _per_rank(lambda r: timemodel.lora_bytes(cfg, depth, r, setup.targets) + head, ranks)
    down_full = _per_rank(lambda r: timemodel.lora_bytes(cfg, L, r, setup.targets) + head, ranks)
    if setup.spec.selection == "rucb":
        fwd = timemodel.forward_flops(cfg, setup.batch_size, setup.seq_len, setup.rank, setup.targets)
        probe_dl = _per_rank(lambda r: timemodel.lora_bytes(cfg, depth, r, setup.targets) + head, ranks)
        later = later + 2 * fwd / prof["flops"] / tau + probe_dl / prof["down_bw"] / tau
        first = first + (2 * fwd / prof["flops"] + probe_dl / prof["down_bw"]) / tau
    time = float(first.max()) + (tau - 1) * float(later.max())
    up = tau * up_d.sum()
    down = down_full.sum() + (tau - 1) * up_d.sum()
    if setup.spec.selection == "rucb":
        down = down + probe_dl.sum()
    if setup.spec.hierarchical:
        g_up = timemodel.lora_bytes(cfg, depth, setup.rank, setup.targets) + head
        g_down = timemodel.lora_bytes(cfg, L, setup.rank, setup.targets) + head
        time += (g_up + g_down) / setup.edge_cloud_bandwidth
        up, down = up + g_up, down + g_down
    return {"time": time, "bytes_up": float(up), "bytes_down": float(down)}


def feasible(setup: Setup, ids: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([A] feasible, [A] estimated time)``: an arm is infeasible if its memory exceeds the
    smallest present device's memory, or its estimated time exceeds ``bandit.time_budget``."""
    cfg = setup.model.cfg
    mem_budget = float(setup.profiles["memory"][ids].min())
    r = int(ranks.max())
    mem = np.array([timemodel.memory_needed(cfg, setup.batch_size, setup.seq_len, int(d), r, setup.targets)
                    for d in setup.arm_depths])
    est = np.array([group_cost(setup, ids, ranks, int(d), int(t))["time"]
                    for d, t in zip(setup.arm_depths, setup.arm_taus)])
    ok = mem <= mem_budget
    if setup.bandit.time_budget is not None:
        ok &= est <= setup.bandit.time_budget
    return ok, est


def run_round(setup: Setup, state: RunState) -> tuple[RunState, dict]:
    """One global round. Returns the new state and the round's record (for metrics.jsonl)."""
    r = state.round
    model, L = setup.model, setup.model.num_layers
    round_key = jax.random.fold_in(jax.random.fold_in(setup.key, SALT_ROUNDS), r)
    rng = np.random.default_rng([setup.seed, SALT_PARTICIPATION, r])
    present_all = sample_participation(len(setup.counts), setup.participation, setup.availability,
                                       setup.assignment, rng)
    bandit = bandit_of(setup)
    probe = make_probe(model, setup.batch_size, setup.n_max, setup.axis)
    bandits, scales = list(state.bandits), np.array(state.reward_scale, np.float64)
    results, groups, dropped = [], [], []
    round_time = up_total = down_total = 0.0

    for k in range(setup.num_groups):
        slots = setup.group_slots[k]
        real = slots >= 0
        ids = np.where(real, slots, 0)
        present = real & present_all[ids]
        rec = {"group": k, "participants": int(present.sum()), "members": int(real.sum())}
        weights = np.where(present, setup.counts[ids], 0).astype(np.float32)
        if weights.sum() == 0:
            groups.append(dict(rec, skipped=True))
            continue
        ranks = np.where(real, state.ranks[ids], setup.rank).astype(np.int32)
        if setup.spec.selection == "rucb":
            ok, est = feasible(setup, ids[present], ranks[present])
            if not ok.any():   # nothing fits: take the cheapest arm and say so
                ok = est == est.min()
                rec["infeasible_fallback"] = True
            arm, info = bandit.select(bandits[k], ok, seed=int(rng.integers(2**31)))
            rec["explore"] = info["explore"]
            # the pull's full log: UCB index per arm (None: unplayed or infeasible)
            rec["ucb_index"] = [float(x) if np.isfinite(x) else None for x in info["index"]]
        else:
            arm = 0
        depth, tau = int(setup.arm_depths[arm]), int(setup.arm_taus[arm])
        gkey = jax.random.fold_in(round_key, k)
        axis = setup.axis
        # padding slots (no data) get ids beyond the real devices so every slot's key is distinct
        dev_ids = axis.put(np.where(real, slots, len(setup.counts) + np.arange(len(slots))).astype(np.int32))
        probe_key = jax.random.fold_in(gkey, PROBE_SALT)
        loss0, n0 = probe(state.trainable, setup.base, setup.group_data[k], dev_ids, probe_key)
        fn = make_group_round(model, setup.optimizer, depth, setup.local_steps, setup.batch_size, setup.n_max,
                              axis, setup.spec.aggregator, setup.hetlora.sparsity)
        tr, w_dev, rank_dev = state.trainable, axis.put(weights), axis.put(ranks)
        bad = np.zeros(len(slots), bool)
        train_loss = []
        for t in range(tau):
            tr, m = fn(tr, setup.base, setup.group_data[k], dev_ids, w_dev, jax.random.fold_in(gkey, t), rank_dev)
            bad |= present & ~np.asarray(m.finite)
            cnt = np.asarray(m.count).sum()
            train_loss.append(float((np.asarray(m.loss) * np.asarray(m.count)).sum() / max(cnt, 1)))
        loss1, _ = probe(tr, setup.base, setup.group_data[k], dev_ids, probe_key)
        pw = np.asarray(n0) * present
        before = float((np.asarray(loss0) * pw).sum() / max(pw.sum(), 1))
        after = float((np.asarray(loss1) * pw).sum() / max(pw.sum(), 1))
        cost = group_cost(setup, ids[present], ranks[present], depth, tau)
        if setup.spec.selection == "rucb":
            rate = (before - after) / max(cost["time"], 1e-12)
            ref = scales[k] if scales[k] > 0 else max(abs(rate), 1e-12)
            # reward 0.5 at the group's typical progress rate (EMA of past |rates|), 1 at twice it
            reward = rucb_lib.reward_from_progress(before, after, cost["time"], 2.0 * ref)
            g = setup.bandit.gamma
            scales[k] = g * ref + (1 - g) * max(abs(rate), 1e-12)
            budget = setup.bandit.time_budget
            bandits[k] = bandit.update(bandits[k], arm, reward,
                                       **({"time": cost["time"], "budget": budget} if budget else {}))
            rec["reward"] = float(reward)
        dropped += [int(i) for i in ids[bad]]
        kept_weight = float(weights[~bad].sum())
        results.append((tr, depth, kept_weight))
        round_time = max(round_time, cost["time"])
        up_total += cost["bytes_up"]
        down_total += cost["bytes_down"]
        groups.append(dict(rec, skipped=False, arm=int(arm), depth=depth, tau=tau, time=cost["time"],
                           loss_before=before, loss_after=after, train_loss=train_loss[-1],
                           dropped=[int(i) for i in ids[bad]]))

    trainable, ranks_new = state.trainable, state.ranks
    if results:
        stack = lambda *xs: jnp.stack(xs)
        g_tr = jax.tree.map(stack, *[tr for tr, _, _ in results])
        lora, head = layerwise_aggregate(g_tr["lora"], g_tr["head"], jnp.asarray([d for _, d, _ in results]),
                                         jnp.asarray([w for _, _, w in results], jnp.float32),
                                         state.trainable["lora"], state.trainable["head"])
        trainable = {"lora": lora, "head": head}
        if setup.spec.aggregator == "hetlora":
            h = setup.hetlora
            ranks_new = hetlora_lib.prune_ranks(state.ranks, hetlora_lib.component_norms(lora), h.prune_factor,
                                                h.prune_threshold, h.min_rank)
    new = RunState(round=r + 1, trainable=trainable, bandits=tuple(bandits), reward_scale=scales,
                   ranks=np.asarray(ranks_new, np.int32), sim_time=state.sim_time + round_time,
                   bytes_up=state.bytes_up + up_total, bytes_down=state.bytes_down + down_total)
    record = {"round": r + 1, "round_time": round_time, "sim_time": new.sim_time, "bytes_up": up_total,
              "bytes_down": down_total, "groups": groups, "dropped_devices": sorted(dropped)}
    if setup.spec.aggregator == "hetlora":
        record["mean_rank"] = float(np.mean(ranks_new))
    return new, record
