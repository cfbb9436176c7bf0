"""The stages every algorithm's round is made of, as plain functions (no algorithm names inside).

A round (see :mod:`hfl_jax.algos.hierfedlora` for the paper's, :mod:`hfl_jax.algos.fedlora`
for the flat one) is: draw who takes part (:func:`sample_participation`), look at each group
(:func:`group_view`), train it with an arm (:func:`train_group`), optionally score progress
(:func:`probe`), charge simulated time and traffic (:func:`group_cost`), aggregate the groups
globally (:func:`global_aggregate`) and advance the clock (:func:`finish_round`).
Everything random is derived from ``(seed, round, group, intra-round, device id)``, so a
round is a pure function of ``(env, state, key)``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.algos.api import AlgoState
from hfl_jax.data.packing import PackSpec, plan_group_round, position_offset, sample_group_indices
from hfl_jax.fed import cost as cost_lib
from hfl_jax.fed.aggregate import layerwise_aggregate
from hfl_jax.fed.engine import make_group_round, make_probe
from hfl_jax.fed.env import Env
from hfl_jax.fed.group_aggregators import FedAvg
from hfl_jax.fed.timemodel import global_round_time
from hfl_jax.fed.xla import signature
from hfl_jax.fed.tiers import TIER_BYTES, TIER_TIMES

PROBE_SALT = 1_000_003  # fold-in constant separating probe keys from training keys
# Salts that give every purpose its own random stream (shared with hfl_jax.driver).
SALT_ROUNDS, SALT_PARTICIPATION, SALT_LORA_INIT = 1, 2, 3
SALT_PARTITION, SALT_PROFILES, SALT_GROUPS, SALT_SUBSET = 11, 12, 13, 14
SALT_PROBE_HOLDOUT, SALT_VALIDATION = 15, 16


def round_key(env: Env, round_: int) -> jax.Array:
    """The PRNG key of global round ``round_`` (what the driver passes to ``algorithm.round``)."""
    return jax.random.fold_in(jax.random.fold_in(env.key, SALT_ROUNDS), round_)


def round_rng(env: Env, round_: int) -> np.random.Generator:
    """The host random stream of a round (participation, then the selectors' draws)."""
    return np.random.default_rng([env.seed, SALT_PARTICIPATION, round_])


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


def participants(env: Env, rng: np.random.Generator) -> np.ndarray:
    """``[N]`` bool: the devices taking part in this round (:func:`sample_participation`)."""
    return sample_participation(env.num_devices, env.participation, env.availability, env.assignment, rng)


def full_ranks(env: Env) -> np.ndarray:
    """``[N]`` every device at the global adapters' rank (homogeneous LoRA)."""
    return np.full(env.num_devices, env.workload.rank, np.int32)


@dataclasses.dataclass(frozen=True)
class GroupView:
    """Group ``k`` in this round, slot by slot (``S`` slots, padding slots hold no device)."""
    k: int
    slots: np.ndarray                  # [S] device id, -1 for padding
    present: np.ndarray                # [S] bool: a real device that takes part
    weights: np.ndarray                # [S] float32 sample counts of present devices, else 0
    ranks: np.ndarray                  # [S] int32 LoRA ranks (padding slots: the global rank)

    @property
    def ids(self) -> np.ndarray:
        """``[S]`` device ids with padding slots mapped to device 0 (for host-side indexing)."""
        return np.where(self.slots >= 0, self.slots, 0)

    @property
    def skipped(self) -> bool:
        return self.weights.sum() == 0

    def record(self) -> dict:
        return {"group": self.k, "participants": int(self.present.sum()), "members": int((self.slots >= 0).sum())}


def group_view(env: Env, k: int, present_all: np.ndarray, ranks: np.ndarray) -> GroupView:
    """Group ``k``'s slots given this round's participants ``[N]`` and device ranks ``[N]``."""
    slots = env.group_slots[k]
    real = slots >= 0
    ids = np.where(real, slots, 0)
    present = real & present_all[ids]
    weights = np.where(present, env.counts[ids], 0).astype(np.float32)
    return GroupView(k, slots, present, weights, np.where(real, ranks[ids], env.workload.rank).astype(np.int32))


def _slot_ids(env: Env, g: GroupView) -> np.ndarray:
    # padding slots (no data) get ids beyond the real devices so every slot's key is distinct
    return np.where(g.slots >= 0, g.slots, env.num_devices + np.arange(len(g.slots))).astype(np.int32)


def _device_ids(env: Env, g: GroupView) -> jax.Array:
    return env.axis.put(_slot_ids(env, g))


def run_pack_rows(env: Env, rounds: int, intra_rounds: int) -> int:
    """The most packed rows any group round of a run can need: the max over rounds ``[0, rounds)``,
    groups and intra-group rounds ``[0, intra_rounds)`` of the plans' row counts (the keys are
    the ones the rounds derive: ``fold_in(fold_in(round_key, group), t)``; a plan does not depend
    on who takes part or which arm is pulled). With it as the row count of every round
    (``data.pack_rows: run``) one program per depth serves the whole run."""
    present, ranks = np.ones(env.num_devices, bool), full_ranks(env)
    views = [group_view(env, k, present, ranks) for k in range(env.num_groups)]
    most = 1
    for r in range(rounds):
        key = round_key(env, r)
        for g in views:
            for t in range(intra_rounds):
                most = max(most, packed_plan(env, g, jax.random.fold_in(jax.random.fold_in(key, g.k), t))[0].rows)
    return most


def packed_plan(env: Env, g: GroupView, key: jax.Array) -> tuple[PackSpec | None, dict]:
    """``(PackSpec, {"plan": ...})`` of group ``g``'s round with key ``key`` when the environment packs
    training steps (:mod:`hfl_jax.data.packing`: the batches drawn ahead on the host and placed in rows),
    else ``(None, {})``."""
    if not env.pack_row_len:
        return None, {}
    counts = np.where(g.slots >= 0, env.counts[g.ids], 0)
    plan, rows = plan_group_round(env.group_lengths[g.k], counts, _slot_ids(env, g), key,
                                  num_steps=env.workload.local_steps, batch_size=env.workload.batch_size,
                                  row_len=env.pack_row_len)
    if env.pack_rows:   # the run's fixed row count (it holds every round's plan: run_pack_rows)
        rows = env.pack_rows
    return PackSpec(rows, env.pack_row_len, position_offset(env.model.cfg)), {"plan": env.axis.put(plan)}


class GroupTraining(NamedTuple):
    """What a group's ``tau`` intra-group rounds left besides the group model."""
    dropped: np.ndarray                # [S] bool: present devices dropped as non-finite in some intra-round
    kept_weight: float                 # sample weight of the group's devices that were not dropped
    train_loss: float                  # mean training loss of the last intra-group round
    devices: Any = None                # with device_lora: the devices' trained trainables [S, ...]


def _group_round_fn(env: Env, *, depth: int, aggregator: Any, optimizer: Any, per_device: bool, pack: Any
                    ) -> tuple[Any, dict]:
    """The compiled group round (:func:`~hfl_jax.fed.engine.make_group_round`) of this environment at
    ``depth``, and the keyword arguments that select the depth (with ``env.shared_depth`` one program
    serves every depth and takes it as an argument)."""
    if env.shared_depth:
        depth, kw = None, {"depth": np.int32(depth)}
    else:
        kw = {}
    return make_group_round(env.model, optimizer or env.optimizer, depth=depth,
                            local_steps=env.workload.local_steps, batch_size=env.workload.batch_size,
                            n_max=env.n_max, axis=env.axis, aggregator=aggregator, per_device=per_device,
                            pack=pack), kw


def _group_inputs(env: Env, g: GroupView, device_lora: Any) -> tuple:
    """``(data, device ids, weights, ranks, extra)``: group ``g``'s arguments of the group round, placed."""
    axis = env.axis
    extra = (device_lora,) if device_lora is not None else ()
    return env.group_data[g.k], _device_ids(env, g), axis.put(g.weights), axis.put(g.ranks), extra


def train_group(env: Env, trainable: Any, g: GroupView, *, depth: int, tau: int, key: jax.Array,
                aggregator: Any = FedAvg(), optimizer: Any = None, device_lora: Any = None,
                update_offset: Any = None) -> tuple[Any, GroupTraining]:
    """``tau`` intra-group rounds of ``E`` local steps at ``depth`` (one compiled call each,
    :func:`~hfl_jax.fed.engine.make_group_round`), each followed by the group aggregation.

    ``optimizer`` defaults to the environment's; ``device_lora`` (``[S, ...]``) makes each device
    start from its own LoRA and returns the trained ones in ``GroupTraining.devices``;
    ``update_offset`` (``[S, ...]``, a tree like ``trainable``) is added to every local step's
    optimizer update of each device (SCAFFOLD's control-variate correction).
    Metrics stay on the accelerator through the loop; the host reads them once at the end.
    """
    per_device = device_lora is not None
    data, ids, weights, ranks, extra = _group_inputs(env, g, device_lora)
    tr, finite, devices = trainable, None, None
    for t in range(tau):
        key_t = jax.random.fold_in(key, t)
        pack, plan = packed_plan(env, g, key_t)
        fn, kw = _group_round_fn(env, depth=depth, aggregator=aggregator, optimizer=optimizer,
                                 per_device=per_device, pack=pack)
        out = fn(tr, env.base, data, ids, weights, key_t, ranks, *extra, **plan, **kw, **_offset_kw(update_offset))
        tr, m = out[0], out[1]
        devices = out[2] if per_device else None
        finite = m.finite if finite is None else finite & m.finite
    bad = g.present & ~np.asarray(finite)
    loss, count = np.asarray(m.loss), np.asarray(m.count)
    train_loss = float((loss * count).sum() / max(count.sum(), 1))
    return tr, GroupTraining(bad, float(g.weights[~bad].sum()), train_loss, devices)


def _offset_kw(update_offset: Any) -> dict:
    # passed only when set, so the calls of every other algorithm keep their signature
    return {} if update_offset is None else {"update_offset": update_offset}


def _probe_call(env: Env, g: GroupView) -> tuple[Any, Callable]:
    """``(compiled probe, (trainable, key) -> its arguments)`` of group ``g`` (held-out examples if any).

    The probe's batches are drawn by the training rounds' sampler (``sample_group_indices``; its
    first step is the batch the probe's own sampler would draw, so the losses are the same), on the
    host: one sampler program for the packed rounds' plans and the probe."""
    held_out = env.probe_data is not None
    data = env.probe_data[g.k] if held_out else env.group_data[g.k]
    n_max, batch_size = (env.probe_n_max if held_out else env.n_max), env.workload.batch_size
    fn = make_probe(env.model, batch_size, n_max, env.axis, drawn=True)
    per_device = env.probe_counts if held_out else env.counts   # host values (a sharded array may span processes)
    counts = jnp.asarray(np.where(g.slots >= 0, per_device[g.ids], 0), jnp.int32)
    ids = jnp.asarray(_slot_ids(env, g))

    def args(tr, key):
        idx, mask = sample_group_indices(jax.random.fold_in(key, PROBE_SALT), ids, counts, n_max=n_max,
                                         num_steps=env.workload.local_steps, batch_size=batch_size)
        return tr, env.base, data, env.axis.put(np.asarray(idx)[:, 0]), env.axis.put(np.asarray(mask)[:, 0])
    return fn, args


def probe(env: Env, trainable: Any, g: GroupView, key: jax.Array) -> float:
    """Mean loss of ``trainable`` over one batch per present device of group ``g``, drawn with the
    group's probe key (the same batches before and after training): the bandit's progress signal.
    Scored on the devices' held-out probe examples when the run holds some out
    (``algorithm.bandit.probe_holdout``), else on their training examples."""
    fn, args = _probe_call(env, g)
    loss, n = fn(*args(trainable, key))
    pw = np.asarray(n) * g.present
    return float((np.asarray(loss) * pw).sum() / max(pw.sum(), 1))


def programs(env: Env, trainable: Any, *, depths, probes: bool = False, aggregator: Any = FedAvg(),
             optimizer: Any = None, device_lora: Any = None, ranks: np.ndarray | None = None,
             pad_groups: bool = False, update_offset: Any = None) -> list[Callable]:
    """Zero-argument callables that compile, ahead of time, every program a round of an algorithm
    may run: each group's round at each of ``depths`` (with the algorithm's aggregator, optimizer,
    per-device adapters and update offsets), the probe when ``probes``, and the small eager operations of the
    round (key derivation, the global aggregation for every number of groups, or only for all of
    them when the algorithm pads to it, ``pad_groups``: :func:`global_aggregate`), each distinct
    program once (groups padded to one size share their programs). Run them in any order,
    concurrently (``hfl_jax.driver.precompile``)."""
    present = np.ones(env.num_devices, bool)
    ranks = full_ranks(env) if ranks is None else ranks
    key = round_key(env, 0)
    out, seen = [], set()
    per_device = device_lora is not None

    def once(program, thunk):   # one thunk per distinct program (a duplicate would only wait for it)
        if program not in seen:
            seen.add(program)
            out.append(thunk)

    def add(fn, *args, **kw):
        once((id(fn), signature(args, kw)), functools.partial(fn.precompile, *args, **kw))

    def add_probe(g):   # its batches are drawn when the thunk runs (by the sampler, maybe compiling it)
        fn, args = _probe_call(env, g)
        data = env.probe_data if env.probe_data is not None else env.group_data
        # the drawn batches' shapes follow from the data's
        once((id(fn), signature((data[g.k],), {})), lambda: fn.precompile(*args(trainable, key)))

    for k in range(env.num_groups):
        g = group_view(env, k, present, ranks)
        data, ids, weights, ranks_k, extra = _group_inputs(env, g, device_lora)
        key0 = jax.random.fold_in(key, 0)
        for d in (depths[:1] if env.shared_depth else depths):   # shared: one program, any depth
            pack, plan = packed_plan(env, g, key0)
            if pack is not None and not env.pack_rows:
                continue   # rows per round: each row count compiles when a round first needs it
            fn, kw = _group_round_fn(env, depth=int(d), aggregator=aggregator, optimizer=optimizer,
                                     per_device=per_device, pack=pack)
            add(fn, trainable, env.base, data, ids, weights, key0, ranks_k, *extra, **plan, **kw,
                **_offset_kw(update_offset))
        if probes:
            add_probe(g)

    def eager_ops():
        # compiled on first use per shape: fold_in, the finite flags' AND, the cloud's aggregation
        jax.block_until_ready(jax.random.fold_in(jax.random.fold_in(key, 0), 0))
        for size in sorted({len(s) for s in env.group_slots}):
            flags = env.axis.put(np.ones(size, bool))
            jax.block_until_ready(flags & flags)
        for n in ((env.num_groups,) if pad_groups else range(1, env.num_groups + 1)):
            jax.block_until_ready(global_aggregate(trainable, [(trainable, int(depths[0]), 1.0)] * n,
                                                   policy=env.model.layer_policy))
    return out + [eager_ops]


def group_cost(env: Env, g: GroupView, depth: int, tau: int, *, hierarchical: bool, probe: bool,
               factors: str = "AB") -> dict:
    """Simulated time and bytes of group ``g``'s round (:func:`hfl_jax.fed.cost.group_cost`) under
    the algorithm's traffic pattern (edge tier, probe, exchanged LoRA factors)."""
    work = dataclasses.replace(env.workload, hierarchical=hierarchical, probe=probe, factors=factors)
    return cost_lib.group_cost(env.model.cfg, env.profiles, work, g.ids[g.present], g.ranks[g.present], depth, tau)


def arm_costs(env: Env, g: GroupView, arm_depths: np.ndarray, arm_taus: np.ndarray, *, time_budget: float | None,
              hierarchical: bool, probe: bool) -> tuple[np.ndarray, np.ndarray]:
    """``([A] feasible, [A] estimated seconds)`` of every arm for group ``g`` (:func:`hfl_jax.fed.cost.arm_costs`)."""
    work = dataclasses.replace(env.workload, hierarchical=hierarchical, probe=probe)
    return cost_lib.arm_costs(env.model.cfg, env.profiles, work, g.ids[g.present], g.ranks[g.present],
                              arm_depths, arm_taus, time_budget)


def global_aggregate(prev: Any, results: list, *, groups: int | None = None, policy: str = "top") -> Any:
    """The cloud's layer-wise aggregation (:func:`~hfl_jax.fed.aggregate.layerwise_aggregate`) of
    ``results``: ``[(group trainable, depth, weight)]``; ``prev`` when no group trained.

    ``groups``: pad ``results`` to this many entries with ``prev`` at weight 0 (no contribution:
    the same values), so one compiled program serves a round whatever number of groups trained.
    ``policy``: the layers a depth trains (the model's ``layer_policy``, ``env.model.layer_policy``);
    any policy trains every layer at depth ``L``, so the flat algorithms leave it out."""
    if not results:
        return prev
    if groups is not None:
        results = list(results) + [(prev, 0, 0.0)] * (groups - len(results))
    return _layerwise(tuple(tr for tr, _, _ in results), jnp.asarray([d for _, d, _ in results]),
                      jnp.asarray([w for _, _, w in results], jnp.float32), prev, policy=policy)


@functools.partial(jax.jit, static_argnames="policy")
def _layerwise(trainables: tuple, depths: jax.Array, weights: jax.Array, prev: Any, policy: str = "top") -> Any:
    """One compiled program per number of groups (op by op, every leaf shape and group count
    compiled its own small programs: seconds of start-up on CPU). Bit-identical to the eager one
    (``experiments/equivalence``)."""
    g_tr = jax.tree.map(lambda *xs: jnp.stack(xs), *trainables)
    lora, head = layerwise_aggregate(g_tr["lora"], g_tr.get("head"), depths, weights, prev["lora"], prev.get("head"),
                                     policy)
    return {"lora": lora} if "head" not in prev else {"lora": lora, "head": head}   # decoders: LoRA only


def round_time(costs: list) -> float:
    """The global round's simulated seconds: its slowest group's (0 with no group)."""
    return global_round_time([c["time"] for c in costs])


def tier_record(costs: list) -> dict:
    """The round's traffic per tier (summed over groups) and its time split into compute,
    device-edge and cloud seconds along the slowest group's critical path."""
    out = {k: float(sum(c[k] for c in costs)) for k in TIER_BYTES}
    slowest = max(costs, key=lambda c: c["time"], default=None)
    out.update({k: float(slowest[k]) if slowest else 0.0 for k in TIER_TIMES})
    return out


def finish_round(state: AlgoState, trainable: Any, costs: list, groups: list, dropped: list,
                 **changes) -> tuple[AlgoState, dict]:
    """The next state (clock advanced by the slowest group, traffic added) and the round's record.

    ``costs``: the groups' :func:`group_cost` dicts; ``groups``: their records; ``dropped``:
    device ids dropped as non-finite; ``changes``: other :class:`AlgoState` fields to replace.
    """
    seconds = round_time(costs)
    up = sum(c["bytes_up"] for c in costs)
    down = sum(c["bytes_down"] for c in costs)
    new = dataclasses.replace(state, round=state.round + 1, trainable=trainable,
                              sim_time=state.sim_time + seconds, bytes_up=state.bytes_up + up,
                              bytes_down=state.bytes_down + down, **changes)
    record = {"round": new.round, "round_time": seconds, "sim_time": new.sim_time, "bytes_up": up,
              "bytes_down": down, **tier_record(costs), "groups": groups, "dropped_devices": sorted(dropped)}
    return new, record
