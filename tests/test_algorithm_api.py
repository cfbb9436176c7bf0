"""The algorithm API: registries, no name-based switching, and the three newer baselines by hand."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hfl_jax.algos import ALGORITHMS
from hfl_jax.algos.selectors import SELECTORS
from hfl_jax.data.partition import PARTITIONERS
from hfl_jax.fed.group_aggregators import GROUP_AGGREGATORS, SVDProductMean
from hfl_jax.models import LoRA

PACKAGE = Path(__file__).resolve().parents[1] / "hfl_jax"


def _name_comparisons(names):
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    quoted = rf"""['"]({alt})['"]"""
    return re.compile(rf"(==|!=)\s*{quoted}|{quoted}\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*{quoted}|startswith\(\s*{quoted}")


def test_no_code_switches_on_an_algorithm_selector_or_aggregator_name():
    names = set(ALGORITHMS) | set(SELECTORS) | set(GROUP_AGGREGATORS)
    pattern = _name_comparisons(names)
    # the pattern does catch such code
    assert pattern.search('if spec.aggregator == "rank_padded":') and pattern.search("x in ('fedlora', 'b')")
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for p in sorted(PACKAGE.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, "behaviour chosen by comparing names (use a registry entry instead):\n" + "\n".join(hits)


# The only modules that may compare model type names: each family's own modules, for its quirks.
FAMILY_MODULES = {
    "hfl_jax/models/bert.py",           # RoBERTa's position ids and head beside BERT's
    "hfl_jax/models/deberta.py",        # DeBERTa v1 against v2/v3
    "hfl_jax/models/decoder.py",        # Llama, Qwen2, Mistral config layouts and biases
    "hfl_jax/models/config.py",         # the encoder config: per-type defaults, RoBERTa's position offset
    "hfl_jax/models/encoder_cost.py",   # DeBERTa's relative-position cost terms
}


def _model_type_hits():
    from hfl_jax.models.families import MODEL_TYPES
    assert set(MODEL_TYPES) >= {"bert", "roberta", "deberta", "deberta-v2", "llama", "qwen2", "mistral"}
    pattern = _name_comparisons(MODEL_TYPES)
    assert pattern.search('cfg.model_type in ("bert", "roberta")') and pattern.search("mt.startswith('deberta')")
    return [(str(p.relative_to(PACKAGE.parent)), f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
            for p in sorted(PACKAGE.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]


def test_no_code_outside_the_model_families_switches_on_a_model_type():
    """The engine, data, objectives, time model and driver ask the family (a ``Family`` field, a config
    property, the config's ``cost_model``), never compare ``model_type`` names."""
    hits = [hit for path, hit in _model_type_hits() if path not in FAMILY_MODULES]
    assert not hits, ("behaviour chosen by comparing model type names outside the family modules (ask the "
                      "family: a Family field, a model config property, its cost_model):\n" + "\n".join(hits))


def test_every_listed_family_module_still_compares_model_types():
    """FAMILY_MODULES shrinks as modules stop needing it (as KNOWN_CYCLE_EDGES in test_imports)."""
    unused = FAMILY_MODULES - {path for path, _ in _model_type_hits()}
    assert not unused, f"delete these from FAMILY_MODULES (no model type comparison left): {sorted(unused)}"


def test_config_validation_reads_the_registries():
    from hfl_jax.config import ConfigError, load_config
    smoke = Path(__file__).resolve().parents[1] / "experiments/configs/smoke.yaml"
    with pytest.raises(ConfigError, match="algorithm.name.*" + ", ".join(ALGORITHMS)):
        load_config(smoke, ["algorithm.name=bogus"], check_model=False)
    with pytest.raises(ConfigError, match="partition.method.*" + ", ".join(PARTITIONERS)):
        load_config(smoke, ["partition.method=bogus"], check_model=False)
    with pytest.raises(ConfigError, match="algorithm.depths.*empty"):
        load_config(smoke, ["algorithm.depths=[]"])
    with pytest.raises(ConfigError, match="algorithm.flexlora.ranks"):
        load_config(smoke, ["algorithm.name=flexlora", "algorithm.flexlora.ranks=[2,8]"])   # lora.rank 4


# --- FFA-LoRA ------------------------------------------------------------------------------------------

def test_ffa_lora_freezes_a_exactly_and_averages_b_by_hand():
    from hfl_jax.algos.ffa_lora import freeze_a
    from hfl_jax.fed.group_aggregators import FedAvg

    lora = LoRA({"query": {"A": jnp.full((1, 2, 1), 0.5), "B": jnp.zeros((1, 1, 2))}}, 1.0)
    trainable = {"lora": lora, "head": {"w": jnp.zeros(2)}}
    opt = freeze_a(optax.adamw(0.1, weight_decay=0.5))
    assert freeze_a(optax.adamw(0.1, weight_decay=0.5)) is not opt and freeze_a(opt) is freeze_a(opt)  # cached
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    assert not np.asarray(updates["lora"].weights["query"]["A"]).any()       # A: exactly zero (no decay)
    assert np.asarray(updates["lora"].weights["query"]["B"]).all()
    # two devices trained B to 1 and 4 with 1 and 3 samples: B = (1 + 12) / 4 = 3.25; A stays 0.5
    new = {"lora": LoRA({"query": {"A": jnp.full((2, 1, 2, 1), 0.5),
                                   "B": jnp.stack([jnp.full((1, 1, 2), 1.0), jnp.full((1, 1, 2), 4.0)])}}, 1.0),
           "head": {"w": jnp.zeros((2, 2))}}
    agg, _, _ = FedAvg()(new, trainable, jnp.array([1.0, 3.0]), jnp.array([1, 1]))
    np.testing.assert_allclose(np.asarray(agg["lora"].weights["query"]["B"]), 3.25)
    np.testing.assert_allclose(np.asarray(agg["lora"].weights["query"]["A"]), 0.5)


# --- FlexLoRA -------------------------------------------------------------------------------------------

def test_flexlora_svd_of_the_weighted_product_mean_by_hand():
    # one layer, in = out = 2, rank 2. Device 0 (weight 1): A B = diag(3, 0); device 1 (weight 3): diag(0, 1) * 4/3
    # mean product P = (1 * diag(3, 0) + 3 * diag(0, 4/3)) / 4 = diag(0.75, 1.0): singular values 1.0 then 0.75
    A = jnp.array([[[[3.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 4.0 / 3.0]]]])   # [M=2, L=1, in=2, r=2]
    B = jnp.array([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])        # [M=2, L=1, r=2, out=2]
    new = {"lora": LoRA({"query": {"A": A, "B": B}}, 1.0), "head": {"w": jnp.zeros((2, 1))}}
    old = {"lora": LoRA({"query": {"A": jnp.zeros((1, 2, 2)), "B": jnp.zeros((1, 2, 2))}}, 1.0),
           "head": {"w": jnp.zeros(1)}}
    agg, finite, used = SVDProductMean()(new, old, jnp.array([1.0, 3.0]), jnp.array([2, 2]))
    a, b = np.asarray(agg["lora"].weights["query"]["A"])[0], np.asarray(agg["lora"].weights["query"]["B"])[0]
    np.testing.assert_allclose(a @ b, np.diag([0.75, 1.0]), atol=1e-6)             # full rank: the mean itself
    # the first component is the best rank-1 approximation: diag(0, 1) (singular value 1.0, direction e2)
    np.testing.assert_allclose(np.outer(a[:, 0], b[0]), np.diag([0.0, 1.0]), atol=1e-6)
    # its norm split evenly between A and B: sqrt(1.0) each
    np.testing.assert_allclose([np.linalg.norm(a[:, 0]), np.linalg.norm(b[0])], [1.0, 1.0], atol=1e-6)
    # a rank-1 device gets exactly that truncation
    from hfl_jax.fed.local import truncate_to
    t = truncate_to(agg["lora"], jnp.asarray(1))
    np.testing.assert_allclose(np.asarray(t.weights["query"]["A"])[0] @ np.asarray(t.weights["query"]["B"])[0],
                               np.diag([0.0, 1.0]), atol=1e-6)
    # a device with a NaN update is dropped; with no weight left the previous adapters stay
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), new)
    agg2, finite2, _ = SVDProductMean()(bad, old, jnp.array([1.0, 0.0]), jnp.array([2, 2]))
    assert not bool(finite2[0]) and not np.asarray(agg2["lora"].weights["query"]["A"]).any()


# --- FedSA-LoRA -----------------------------------------------------------------------------------------

def test_fedsa_lora_keeps_b_on_devices_and_averages_a_by_hand():
    from hfl_jax.algos.fedsa_lora import KeepB
    from hfl_jax.fed.group_aggregators import FedAvg

    keep = KeepB()
    global_lora = LoRA({"query": {"A": jnp.full((1, 1, 1), 2.0), "B": jnp.zeros((1, 1, 1))}}, 1.0)
    device_b = {"B": {"query": jnp.array([[[[1.0]]], [[[5.0]]], [[[7.0]]]])}}     # [S=3, L=1, r=1, out=1]
    starts = keep.starts(global_lora, device_b)
    np.testing.assert_array_equal(np.asarray(starts.weights["query"]["A"])[:, 0, 0, 0], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(np.asarray(starts.weights["query"]["B"])[:, 0, 0, 0], [1.0, 5.0, 7.0])
    # devices 0 and 1 trained (A -> 3 and 6, B -> 10 and 20); device 2 absent
    trained = LoRA({"query": {"A": jnp.array([3.0, 6.0, 2.0]).reshape(3, 1, 1, 1),
                              "B": jnp.array([10.0, 20.0, 7.0]).reshape(3, 1, 1, 1)}}, 1.0)
    new_b = keep.update(device_b, trained, jnp.array([True, True, False]))
    np.testing.assert_array_equal(np.asarray(new_b["B"]["query"])[:, 0, 0, 0], [10.0, 20.0, 7.0])
    # the server averages A over the present devices (weights 1 and 3): (3 + 18) / 4 = 5.25
    agg, _, _ = FedAvg()({"lora": trained, "head": {"w": jnp.zeros((3, 1))}},
                         {"lora": global_lora, "head": {"w": jnp.zeros(1)}}, jnp.array([1.0, 3.0, 0.0]),
                         jnp.array([1, 1, 1]))
    np.testing.assert_allclose(np.asarray(agg["lora"].weights["query"]["A"]), 5.25)
    # the evaluation model's B is the same weighted mean of the devices' B: (10 + 60) / 4
    np.testing.assert_allclose(np.asarray(agg["lora"].weights["query"]["B"]), 17.5)


def test_traffic_of_the_factor_sharing_baselines(monkeypatch):
    """FFA-LoRA sends only B, FedSA-LoRA only A: for square q/v projections half of FedLoRA's LoRA bytes."""
    from hfl_jax.fed import timemodel
    from hfl_jax.models import EncoderConfig
    cfg = EncoderConfig(model_type="bert", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2,
                        intermediate_size=16, num_labels=2)
    full = timemodel.lora_bytes(cfg, 2, 4)
    assert timemodel.lora_bytes(cfg, 2, 4, factors="A") == timemodel.lora_bytes(cfg, 2, 4, factors="B") == full / 2
    with pytest.raises(ValueError, match="factors"):
        timemodel.lora_bytes(cfg, 2, 4, factors="C")
