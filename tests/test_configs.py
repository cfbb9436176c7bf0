"""Every committed experiment config loads and validates offline (paper-scale ones are not run)."""
from pathlib import Path

import pytest

from hfl_jax.config import ConfigError, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "experiments" / "configs").rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments" / "configs")))
def test_committed_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.rounds >= 1


def test_paper_scale_configs_are_committed():
    paper = {load_config(p).name: load_config(p) for p in (ROOT / "experiments/configs/paper").glob("*.yaml")}
    assert {c.data.task for c in paper.values()} == {"sst2", "qnli", "qqp", "mnli", "instruct"}
    for c in paper.values():
        assert c.partition.num_devices == 80
        assert c.model.name in ("FacebookAI/roberta-base", "microsoft/deberta-large",   # the paper's
                                "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B")          # decoders, paper-shaped
    with pytest.raises(ConfigError, match="algorithm.depths"):
        load_config(ROOT / "experiments/configs/paper/roberta_base_sst2.yaml", ["algorithm.depths=[1,13]"])


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {rounds: 3}\n")
    (tmp_path / "b.yaml").write_text("name: from_b\ntrain: {rounds: 9, batch_size: 4}\n")
    merged = read_yaml(tmp_path / "a.yaml")
    assert merged == {"name": "from_b", "train": {"rounds": 3, "batch_size": 4}}
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        read_yaml(tmp_path / "a.yaml")


def test_wrong_types_and_values_name_the_key():
    for override, key in [("lora.targets=query", "lora.targets"), ("train.lr=0", "train.lr"),
                          ("partition.alpha=-1", "partition.alpha"), ("seed=1.5", "seed"),
                          ("algorithm.name=fedsgd", "algorithm.name"), ("seed=-1", "seed"),
                          ("devices.edge_cloud_bandwidth=0", "devices.edge_cloud_bandwidth"),
                          ("data.train_subset=0", "data.train_subset"),
                          ("algorithm.hetlora.min_rank=0", "algorithm.hetlora.min_rank"),
                          ("lora.targets=[query,", "lora.targets")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(ROOT / "experiments/configs/smoke.yaml", [override])


def test_exponent_without_dot_is_a_number():
    cfg = load_config(ROOT / "experiments/configs/smoke.yaml", ["devices.edge_cloud_bandwidth=100e6"])
    assert cfg.devices.edge_cloud_bandwidth == 1e8


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_heterogeneous_ranks_default_from_lora_rank(name, tmp_path):
    """``algorithm.{flexlora,hetlora}.ranks`` null (the default) derives from ``lora.rank``:
    (r//4, r//2, r), at least 1, deduplicated; so the smoke config (rank 4) runs either baseline.
    Explicit ranks are still checked against lora.rank, and a run directory without the key
    (written when the default was [2, 4, 8]) reads back [2, 4, 8]."""
    import yaml

    from hfl_jax.algos.hetlora import default_ranks
    from hfl_jax.config import load_run_config, to_dict

    assert [default_ranks(r) for r in (1, 2, 4, 8, 16)] == [(1,), (1, 2), (1, 2, 4), (2, 4, 8), (4, 8, 16)]
    smoke = ROOT / "experiments/configs/smoke.yaml"
    cfg = load_config(smoke, [f"algorithm.name={name}"])      # lora.rank 4: validates and builds
    assert getattr(cfg.algorithm, name).ranks == (1, 2, 4)
    cfg8 = load_config(smoke, [f"algorithm.name={name}", "lora.rank=8"])
    assert getattr(cfg8.algorithm, name).ranks == (2, 4, 8)
    explicit = load_config(smoke, [f"algorithm.name={name}", f"algorithm.{name}.ranks=[4,1]"])
    assert getattr(explicit.algorithm, name).ranks == (4, 1)    # explicit: kept as given
    with pytest.raises(ConfigError, match=f"algorithm.{name}.ranks"):
        load_config(smoke, [f"algorithm.name={name}", f"algorithm.{name}.ranks=[2,8]"])
    raw = to_dict(cfg8)
    del raw["algorithm"][name]["ranks"]
    raw["lora"]["rank"] = 16
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert getattr(load_run_config(tmp_path).algorithm, name).ranks == (2, 4, 8)
