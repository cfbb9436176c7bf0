"""Compile-ahead (``train.compile_ahead``): every program a run's rounds need is compiled before
round 1, so no round compiles anything, even when the bandit changes arms."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hfl_jax.config import load_config
from hfl_jax.driver import build, next_round, precompile
from hfl_jax.fed.engine import make_evaluate
from test_recompilation import CompileCounter

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests/configs/tiny_v1.yaml"


@pytest.mark.parametrize("name", ["hierfedlora"])   # the flat algorithms' programs: test_algorithm_api's builders
def test_no_round_compiles_after_compile_ahead(name):
    # a fresh optimizer setting (lr) so no program compiled by another test is reused
    cfg = load_config(SMOKE, [f"algorithm.name={name}", "model.tiny.num_layers=2", "algorithm.depths=[1,2]",
                              "algorithm.taus=[1,2]", "train.lr=0.00271", "lora.rank=4",
                              "algorithm.hetlora.ranks=[1,2,4]"])
    exp = build(cfg)
    state = exp.initial
    with CompileCounter() as ahead:
        n = precompile(exp, state)
    assert n >= 2 and any("group_round" in x for x in ahead.names)
    evaluate = make_evaluate(exp.env.model)
    arms = set()
    with CompileCounter() as rounds:
        for _ in range(5):
            state, rec = next_round(exp, state)
            jax.block_until_ready(evaluate(state.trainable, exp.env.base, exp.eval_data))
            arms |= {(g["depth"], g["tau"]) for g in rec["groups"] if not g["skipped"]}
    assert rounds.names == [], f"compiled during rounds: {rounds.names}"
    if name == "hierfedlora":
        assert len({d for d, _ in arms}) == 2   # the bandit used both depths, neither compiled in a round


def test_group_padding_exact_matches_largest():
    """``train.group_padding``: groups padded to the largest (one program per depth for every group)
    or each to its own size (no padding work); the rounds agree to float rounding."""
    over = ["algorithm.name=hierfedlora_fixed", "model.tiny.num_layers=1", "algorithm.depths=[1]",
            "algorithm.fixed_depth=1", "algorithm.fixed_tau=1", "partition.num_devices=7", "algorithm.num_groups=2",
            "train.lr=0.00313", "train.local_steps=2", "lora.rank=4"]
    records, sizes = {}, {}
    for mode in ("largest", "exact"):
        exp = build(load_config(SMOKE, over + [f"train.group_padding={mode}"]))
        sizes[mode] = [len(s) for s in exp.env.group_slots]
        state, recs = exp.initial, []
        for _ in range(2):
            state, rec = next_round(exp, state)
            recs.append(rec)
        records[mode] = (recs, state.trainable)
    assert sorted(sizes["largest"]) == [4, 4] and sorted(sizes["exact"]) == [3, 4]
    (a, ta), (b, tb) = records["largest"], records["exact"]
    for ra, rb in zip(a, b):
        assert [g["train_loss"] for g in ra["groups"]] == pytest.approx([g["train_loss"] for g in rb["groups"]],
                                                                         rel=1e-5)
        assert ra["sim_time"] == rb["sim_time"] and ra["bytes_up"] == rb["bytes_up"]
    for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_shared_depth_program_compiles_one_group_round_for_every_depth():
    """``train.depth_program: shared``: one group-round program serves both depths of the arm grid
    (two with ``per_depth``), no round compiles, and the first round agrees with ``per_depth`` to
    float rounding (later rounds may pull other arms: the bandit sees rewards that differ in the
    last bits)."""
    over = ["algorithm.name=hierfedlora", "model.tiny.num_layers=2", "algorithm.depths=[1,2]",
            "algorithm.taus=[1]", "train.lr=0.00293", "lora.rank=4", "train.local_steps=2"]
    first = {}
    for mode in ("per_depth", "shared"):
        exp = build(load_config(SMOKE, over + [f"train.depth_program={mode}"]))
        assert len({len(s) for s in exp.env.group_slots}) == 1   # one group shape
        with CompileCounter() as ahead:
            precompile(exp, exp.initial)
        assert ahead.count("group_round") == (1 if mode == "shared" else 2), (mode, ahead.names)
        state, depths = exp.initial, set()
        with CompileCounter() as rounds:
            for r in range(2):   # each group's bandit tries both arms in its first two pulls
                state, rec = next_round(exp, state)
                depths |= {g["depth"] for g in rec["groups"] if not g["skipped"]}
                if r == 0:
                    first[mode] = (rec, state.trainable)
        assert rounds.count("group_round") == 0 and depths == {1, 2}, (mode, rounds.names, depths)
    (ra, ta), (rb, tb) = first["per_depth"], first["shared"]
    assert [g["depth"] for g in ra["groups"]] == [g["depth"] for g in rb["groups"]]
    assert [g["train_loss"] for g in rb["groups"]] == pytest.approx([g["train_loss"] for g in ra["groups"]], rel=1e-5)
    for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth_program", ["shared"])   # per_depth: experiments/equivalence/compile_ahead.py
def test_compile_ahead_changes_no_metric(tmp_path, depth_program):
    """The same run with the rounds' programs compiled lazily (``train.compile_ahead: false``: each
    compiles when a round first calls it) and ahead of time: metrics.jsonl equal byte for byte,
    wall-clock fields aside. Lazily first: the ahead-of-time run then fills the programs'
    executables (a fresh learning rate: programs no other test compiled)."""
    from hfl_jax.driver import run

    over = ["train.rounds=3", "train.lr=0.00317", "algorithm.taus=[1,2]", f"train.depth_program={depth_program}"]
    lines = {}
    for ahead in (False, True):
        out = tmp_path / f"ahead_{ahead}"
        run(load_config(SMOKE, over + [f"train.compile_ahead={str(ahead).lower()}"]), out, plots=False)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        for r in recs:
            r.pop("wall_time")
        lines[ahead] = recs
    assert len(lines[True]) == 3 and lines[True] == lines[False]
