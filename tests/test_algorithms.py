"""End-to-end rounds of every algorithm on a tiny encoder; participation; HetLoRA pieces."""
import dataclasses

import jax
import jax.numpy as jnp
import chex
import numpy as np
import pytest

from hfl_jax.algos import ALGORITHMS
from hfl_jax.algos import hetlora as hetlora_lib
from hfl_jax.algos.stages import round_key, sample_participation
from hfl_jax.config import load_config
from hfl_jax.driver import build, next_round
from hfl_jax.fed.aggregate import pad_rank, rank_padded_mean, truncate_rank
from hfl_jax.models import LoRA

SMOKE = "tests/configs/tiny_v1.yaml"   # the pre-issue-15 smoke setting
# 2 layers (depths 1, 2): the programs compile in about half the time of the fixture's 4 layers
TWO_LAYERS = ["model.tiny.num_layers=2", "algorithm.depths=[1,2]"]


def _rounds(exp, n):
    state, records = exp.initial, []
    for _ in range(n):
        state, rec = next_round(exp, state)
        records.append(rec)
    return state, records


# The federated optimizers (FedProx, SCAFFOLD, the server optimizers) run two rounds on the tiny
# decoder (tests/test_decoder_engine.py, every algorithm) and hand-computed rounds on this encoder
# (tests/test_fed_optimizers.py, with resume for fedavgm, fedadam, scaffold); here the rest, to keep
# the suite under 12 minutes on 2 cores.
FED_OPTIMIZERS = {"fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - FED_OPTIMIZERS))
def test_algorithm_runs_several_rounds(name, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    cfg = load_config(SMOKE, [f"algorithm.name={name}", "lora.rank=4", "algorithm.hetlora.ranks=[1,2,4]",
                              "algorithm.flexlora.ranks=[1,2,4]", *TWO_LAYERS])
    exp = build(cfg)
    from hfl_jax.algos import stages
    probe_calls = []
    real_probe = stages.probe
    monkeypatch.setattr(stages, "probe", lambda *a, **k: probe_calls.append(1) or real_probe(*a, **k))
    state, records = _rounds(exp, 3)
    assert state.round == 3 and state.sim_time > 0
    hierarchical = name.startswith("hierfedlora")
    # only a learning selector computes the probe (2 per active group and round); the others never run it
    bandit = hierarchical and name not in ("hierfedlora_fixed", "hierfedlora_random_arm")
    assert len(probe_calls) == (2 * sum(not g["skipped"] for r in records for g in r["groups"]) if bandit else 0)
    for rec in records:
        active = [g for g in rec["groups"] if not g["skipped"]]
        assert active and all(g["time"] > 0 and np.isfinite(g["train_loss"]) for g in active)
        if hierarchical:
            assert len(rec["groups"]) == 2
        else:
            assert len(rec["groups"]) == 1 and active[0]["depth"] == exp.env.model.num_layers
        # only a bandit probes and is rewarded
        assert all(("reward" in g) == bandit and ("loss_after" in g) == bandit for g in active)
    from hfl_jax.fed.engine import make_evaluate
    loss, acc = make_evaluate(exp.env.model)(state.trainable, exp.env.base, exp.eval_data)
    assert np.isfinite(float(loss)) and 0 <= float(acc) <= 1
    if name in ("hetlora", "flexlora"):
        assert sorted(set(exp.initial.host["ranks"].tolist())) == [1, 2, 4]
        assert "mean_rank" in records[-1]


def test_half_participation_is_deterministic_and_absent_groups_skip(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    cfg = load_config(SMOKE, ["train.participation=0.5", *TWO_LAYERS])
    exp = build(cfg)
    s1, r1 = _rounds(exp, 2)
    s2, r2 = _rounds(build(cfg), 2)
    assert [g["participants"] for g in r1[0]["groups"]] == [2, 2]
    assert r1 == r2
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every device unavailable: all groups skip, nothing changes but the round counter
    env = dataclasses.replace(exp.env, availability=1e-9)
    state, rec = exp.algorithm.round(env, exp.initial, round_key(env, 0))
    assert all(g["skipped"] for g in rec["groups"]) and state.round == 1 and state.sim_time == 0.0
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(exp.initial.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_participation_counts():
    assignment = np.array([0] * 6 + [1] * 4)
    rng = np.random.default_rng(0)
    p = sample_participation(10, 0.5, 1.0, assignment, rng)
    assert p[:6].sum() == 3 and p[6:].sum() == 2
    p2 = sample_participation(10, 0.5, 1.0, assignment, np.random.default_rng(0))
    np.testing.assert_array_equal(p, p2)


def test_hetlora_zero_padding_aggregation_hand_example():
    # two devices, one layer, in = out = 1, r_max = 2; device 0 has rank 1, device 1 rank 2
    A = jnp.array([[[[1.0, 0.0]]], [[[3.0, 5.0]]]])          # [M=2, L=1, in=1, r=2]
    B = jnp.array([[[[2.0], [0.0]]], [[[4.0], [6.0]]]])      # [M=2, L=1, r=2, out=1]
    lora = LoRA({"query": {"A": A, "B": B}}, 1.0)
    out = rank_padded_mean(lora, jnp.array([1, 2]), jnp.array([1.0, 3.0]), padding="holders")
    # holders: component 0: (1*1 + 3*3) / 4 = 2.5 ; component 1: only device 1 -> 5
    np.testing.assert_allclose(np.asarray(out.weights["query"]["A"])[0, 0], [2.5, 5.0])
    # B component 0: (1*2 + 3*4) / 4 = 3.5 ; component 1: 6
    np.testing.assert_allclose(np.asarray(out.weights["query"]["B"])[0, :, 0], [3.5, 6.0])
    # zeros (the HetLoRA paper, the default): device 0's padded zero enters component 1's mean:
    # A_1 = (1*0 + 3*5) / 4 = 3.75, B_1 = (1*0 + 3*6) / 4 = 4.5; component 0 as above
    out = rank_padded_mean(lora, jnp.array([1, 2]), jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(np.asarray(out.weights["query"]["A"])[0, 0], [2.5, 3.75])
    np.testing.assert_allclose(np.asarray(out.weights["query"]["B"])[0, :, 0], [3.5, 4.5])
    # with equal ranks both readings are the ordinary weighted mean
    same = [rank_padded_mean(lora, jnp.array([2, 2]), jnp.array([1.0, 3.0]), padding=p) for p in ("zeros", "holders")]
    chex.assert_trees_all_equal(same[0].weights, same[1].weights)
    with pytest.raises(ValueError, match="padding"):
        rank_padded_mean(lora, jnp.array([1, 2]), jnp.array([1.0, 3.0]), padding="bogus")
    small = truncate_rank(LoRA({"query": {"A": A[1], "B": B[1]}}, 1.0), 1)
    assert small.weights["query"]["A"].shape == (1, 1, 1)
    padded = pad_rank(small, 2)
    np.testing.assert_allclose(np.asarray(padded.weights["query"]["A"])[0, 0], [3.0, 0.0])
    np.testing.assert_allclose(np.asarray(padded.weights["query"]["B"])[0, :, 0], [4.0, 0.0])


def test_hetlora_rank_assignment_and_pruning():
    ranks = hetlora_lib.assign_ranks(np.array([5.0, 1.0, 3.0, 2.0, 4.0, 6.0]), (2, 4, 8))
    np.testing.assert_array_equal(ranks, [8, 2, 4, 2, 4, 8])
    norms = np.array([1.0, 1.0, 0.5, 0.5, 0.01, 0.01, 0.01, 0.01])
    # rank 8 -> 4 drops components 4..7 (norm 0.02) vs kept (norm ~1.58): pruned at threshold 0.05
    # rank 4 -> 2 drops components 2..3 (norm 0.71) vs kept (1.41): kept
    np.testing.assert_array_equal(hetlora_lib.prune_ranks(np.array([8, 4]), norms, 0.5, 0.05, 1), [4, 4])


def test_hetlora_sparsity_weights_hand_example():
    from hfl_jax.fed.group_aggregators import adapter_norms, update_norms
    # one layer, in = out = 1, r_max = 2; the group's adapter A = [1, 1], B = [1, 1] (A B = 2)
    old = {"lora": LoRA({"query": {"A": jnp.ones((1, 1, 2)), "B": jnp.ones((1, 2, 1))}}, 1.0)}
    # device 0 (rank 1) ends at A B = 3 * 1; device 1 (rank 2) at A B = 2 * 1 + 1 * 1 = 3
    A = jnp.array([[[[3.0, 0.0]]], [[[2.0, 1.0]]]])
    B = jnp.array([[[[1.0], [0.0]]], [[[1.0], [1.0]]]])
    new = {"lora": LoRA({"query": {"A": A, "B": B}}, 1.0)}
    # "update": against the truncation each received (rank 1: A B = 1, rank 2: A B = 2)
    np.testing.assert_allclose(np.asarray(update_norms(new, old, jnp.array([1, 2]))), [2.0, 1.0])
    # "adapter": the whole adapter's product
    np.testing.assert_allclose(np.asarray(adapter_norms(new, old, jnp.array([1, 2]))), [3.0, 3.0])


def test_hetlora_sparsity_setting_changes_the_aggregate(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    finals = {}
    for sparsity in ("update", "adapter", "none", "holders"):
        setting = ["algorithm.hetlora.padding=holders"] if sparsity == "holders" else [
            f"algorithm.hetlora.sparsity={sparsity}"]
        cfg = load_config(SMOKE, ["algorithm.name=hetlora", "lora.rank=4", "algorithm.hetlora.ranks=[1,2,4]",
                                  *setting, *TWO_LAYERS])
        state, _ = _rounds(build(cfg), 1)
        finals[sparsity] = np.asarray(state.trainable["lora"].weights["query"]["B"])
    assert all(np.isfinite(v).all() for v in finals.values())
    assert not np.allclose(finals["update"], finals["none"])
    assert not np.allclose(finals["adapter"], finals["none"])
    assert not np.allclose(finals["adapter"], finals["holders"])   # "adapter" + "zeros" are the defaults
    with pytest.raises(Exception, match="algorithm.hetlora.sparsity"):
        load_config(SMOKE, ["algorithm.hetlora.sparsity=bogus"])


def test_hetlora_component_nobody_holds_keeps_previous_value():
    A = jnp.ones((2, 1, 1, 3))
    B = jnp.ones((2, 1, 3, 1))
    prev = LoRA({"query": {"A": jnp.full((1, 1, 3), 9.0), "B": jnp.full((1, 3, 1), 9.0)}}, 1.0)
    for padding, held_by_one in (("holders", 1.0), ("zeros", 0.5)):
        out = rank_padded_mean(LoRA({"query": {"A": A, "B": B}}, 1.0), jnp.array([1, 2]), jnp.array([1.0, 1.0]),
                               prev, padding=padding)
        np.testing.assert_allclose(np.asarray(out.weights["query"]["A"])[0, 0], [1.0, held_by_one, 9.0])
        np.testing.assert_allclose(np.asarray(out.weights["query"]["B"])[0, :, 0], [1.0, held_by_one, 9.0])


def test_probe_cost_is_charged_to_bandit_algorithms(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    from hfl_jax.fed.cost import group_cost
    exp = build(load_config(SMOKE))
    ids, ranks, env = np.arange(4), np.full(4, 4), exp.env
    cost = lambda probe: group_cost(env.model.cfg, env.profiles, dataclasses.replace(env.workload, probe=probe),
                                    ids, ranks, 2, 1)
    with_probe, without = cost(True), cost(False)
    assert with_probe["time"] > without["time"] and with_probe["bytes_down"] > without["bytes_down"]
