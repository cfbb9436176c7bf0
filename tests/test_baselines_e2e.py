"""FFA-LoRA, FedSA-LoRA and FlexLoRA end to end: through the command line, exact resume, PEFT export."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from hfl_jax import cli
from hfl_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "configs" / "tiny_v1.yaml"   # the pre-issue-15 smoke setting (4 layers, q/v)
NEW = ["ffa_lora", "fedsa_lora", "flexlora"]
SETTINGS = ["lora.rank=4", "algorithm.flexlora.ranks=[1,2,4]", "train.rounds=3", "checkpoint.every=1"]


def _strip(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k != "wall_time"}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _arrays(run_dir):
    from hfl_jax import checkpoint as ckpt
    mgr = ckpt.manager(run_dir / "checkpoints", 10)
    return mgr.latest_step(), mgr.restore(mgr.latest_step())["trainable"]


@pytest.mark.parametrize("name", NEW)
def test_new_baseline_runs_from_the_command_line_and_resumes_exactly(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    full, part = tmp_path / "full", tmp_path / "part"
    sets = sum((["--set", s] for s in SETTINGS + [f"algorithm.name={name}"]), [])
    assert cli.main(["run", str(SMOKE), *sets, "--out", str(full), "--quiet"]) == 0
    # the same run stopped after 2 rounds, then resumed to 3 from its checkpoint
    assert cli.main(["run", str(SMOKE), *sets, "--set", "train.rounds=2", "--out", str(part), "--quiet"]) == 0
    raw = yaml.safe_load((part / "config.yaml").read_text())
    raw["train"]["rounds"] = 3
    (part / "config.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["resume", str(part), "--quiet"]) == 0
    assert _strip(full) == _strip(part) and len(_strip(full)) == 3
    (s1, a), (s2, b) = _arrays(full), _arrays(part)
    assert s1 == s2 == 3
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for (pa, xa), (pb, xb) in zip(leaves_a, leaves_b):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
    if name == "fedsa_lora":   # the devices' own B are part of the checkpoint
        assert "device" in a and np.asarray(a["device"]["B"]["query"]).shape[0] >= 8


def test_new_baselines_differ_from_fedlora_in_the_way_they_should(monkeypatch):
    from hfl_jax.driver import build, next_round
    monkeypatch.chdir(ROOT)
    out = {}
    for name in ["fedlora"] + NEW:
        exp = build(load_config(SMOKE, SETTINGS + [f"algorithm.name={name}"]))
        state, rec = next_round(exp, exp.initial)
        out[name] = (exp, state, rec)
    exp0, s0, r0 = out["fedlora"]
    a0 = np.asarray(exp0.initial.trainable["lora"].weights["query"]["A"])
    # FFA-LoRA: A untouched by training (the weighted means' float rounding moves it by ~1 ulp), B trained;
    # half of FedLoRA's LoRA upload
    _, s, r = out["ffa_lora"]
    np.testing.assert_allclose(np.asarray(s.trainable["lora"].weights["query"]["A"]), a0, rtol=1e-6, atol=0)
    assert np.abs(np.asarray(s.trainable["lora"].weights["query"]["B"])).max() > 0
    assert r["bytes_up"] < r0["bytes_up"]
    # FedSA-LoRA: per-device B differ from each other after a round; only A crosses the link
    _, s, r = out["fedsa_lora"]
    b = np.asarray(s.device["B"]["query"])
    assert not np.allclose(b[0], b[1]) and r["bytes_up"] < r0["bytes_up"]
    # FlexLoRA: heterogeneous ranks, global adapter refactored by SVD (components ordered by size)
    exp, s, r = out["flexlora"]
    assert sorted(set(exp.initial.host["ranks"].tolist())) == [1, 2, 4]
    A = np.asarray(s.trainable["lora"].weights["query"]["A"])
    B = np.asarray(s.trainable["lora"].weights["query"]["B"])
    norms = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=2)     # [L, r] component sizes
    assert np.all(np.diff(norms, axis=1) <= 1e-6)


@pytest.mark.parametrize("name", NEW)
def test_new_baseline_exports_to_peft(name, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from hfl_jax.driver import build, next_round
    from hfl_jax.export import export_peft, load_peft
    monkeypatch.chdir(ROOT)
    exp = build(load_config(SMOKE, SETTINGS + [f"algorithm.name={name}"]))
    state, _ = next_round(exp, exp.initial)
    params = {**exp.env.base, "head": state.trainable["head"]}
    export_peft(exp.env.model, params, state.trainable["lora"], tmp_path, "tiny-test-base")
    params2, lora2 = load_peft(exp.env.model, params, tmp_path)
    for x, y in zip(jax.tree.leaves(state.trainable["lora"]), jax.tree.leaves(lora2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
