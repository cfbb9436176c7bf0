"""``algorithm.layer_policy`` (issue 29 item 2): which ``d`` layers a depth trains (top, bottom,
spread); local training changes exactly those, the layer-wise aggregate averages each layer over
the groups that trained it, the cost model's backward pass runs down to the lowest trained layer."""
import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hfl_jax.algos.stages import global_aggregate
from hfl_jax.config import ConfigError, load_config
from hfl_jax.fed import cost as cost_lib
from hfl_jax.fed import timemodel as tm
from hfl_jax.fed.local import base_of, make_optimizer, make_train_step
from hfl_jax.models import EncoderConfig, EncoderModel, LoRA, LoRAConfig, init_lora
from hfl_jax.models.lora import LAYER_POLICIES, layer_mask, lowest_trained_layer
from hfl_jax.models.tiny import tiny_decoder

CFG = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=16, num_layers=6, num_heads=2,
                    intermediate_size=24, max_position_embeddings=16, num_labels=2)


# ----------------------------------------------------------------------------
# The layer set
# ----------------------------------------------------------------------------


def test_layer_sets_hand_examples():
    ids = lambda L, d, p: np.flatnonzero(layer_mask(L, d, p)).tolist()
    assert ids(12, 4, "top") == [8, 9, 10, 11]
    assert ids(12, 4, "bottom") == [0, 1, 2, 3]
    assert ids(12, 4, "spread") == [2, 5, 8, 11]           # 11 - floor(k * 12 / 4), k = 0..3
    assert ids(12, 3, "spread") == [3, 7, 11]
    assert ids(6, 2, "spread") == [2, 5]
    assert ids(6, 4, "spread") == [1, 2, 4, 5]              # 5 - floor(k * 6 / 4) = 5, 4, 2, 1
    for p in LAYER_POLICIES:
        assert ids(6, 0, p) == [] and ids(6, 6, p) == list(range(6))
    assert ids(6, 1, "spread") == [5]
    for L in range(1, 13):
        for d in range(L + 1):
            for p in LAYER_POLICIES:
                m = layer_mask(L, d, p)
                assert m.sum() == d
                assert lowest_trained_layer(L, d, p) == (np.flatnonzero(m).min() if d else L)
            # spread: the formula, evenly spaced from the top
            assert ids(L, d, "spread") == sorted(L - 1 - k * L // d for k in range(d))
    with pytest.raises(ValueError, match="layer policy"):
        layer_mask(6, 2, "middle")
    with pytest.raises(ValueError, match="depth"):
        layer_mask(6, 7, "spread")


def test_traced_depth_mask_equals_static():
    """The jnp mask of a traced depth (the shared program, the aggregation's ``[K, L]``) and the
    traced lowest layer (the gradient cut) equal the static ones, for every depth."""
    for L in (1, 2, 5, 6, 12):
        depths = jnp.arange(L + 1)
        for p in LAYER_POLICIES:
            traced = jax.jit(lambda d: (layer_mask(L, d[:, None], p), lowest_trained_layer(L, d, p)))
            masks, lowest = traced(depths)
            for d in range(L + 1):
                np.testing.assert_array_equal(np.asarray(masks[d]), layer_mask(L, d, p))
                assert int(lowest[d]) == lowest_trained_layer(L, d, p), (L, d, p)


# ----------------------------------------------------------------------------
# Local training: trained layers change, every other adapter is bit-identical
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _encoder():
    """(params, trainable with random B, batch) of a 6-layer encoder, built once."""
    model = EncoderModel(CFG)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    lora = init_lora(jax.random.PRNGKey(3), CFG, LoRAConfig(rank=2, targets=("query", "value")))
    k = jax.random.PRNGKey(1)
    lora = LoRA({t: {"A": ab["A"], "B": 0.1 * jax.random.normal(jax.random.fold_in(k, i), ab["B"].shape)}
                 for i, (t, ab) in enumerate(lora.weights.items())}, lora.scale)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(1, CFG.vocab_size, (4, 8))), "attention_mask": jnp.ones((4, 8), int),
             "token_type_ids": jnp.zeros((4, 8), int), "labels": jnp.asarray([0, 1, 1, 0]), "mask": jnp.ones(4, bool)}
    return params, {"lora": lora, "head": params["head"]}, batch


@functools.lru_cache(maxsize=None)
def _step(policy: str, shared: bool, depth: int = 2):
    """One AdamW step of the encoder under ``policy`` at ``depth``, its depth static or traced
    (``shared``: ``train.depth_program: shared``), compiled once per case."""
    params, trainable, batch = _encoder()
    model, inner = EncoderModel(CFG, layer_policy=policy), optax.adamw(1e-2, weight_decay=0.1)

    def step(tr, d):
        opt = make_optimizer(inner, CFG.num_layers, d, policy)
        return make_train_step(model, opt, d)(tr, opt.init(tr), base_of(params), batch)[0]
    if shared:
        return jax.jit(step)(trainable, jnp.int32(depth))
    return jax.jit(lambda tr: step(tr, depth))(trainable)


@pytest.mark.parametrize("policy,shared", [("top", False), ("bottom", False), ("spread", False), ("spread", True)])
def test_local_step_trains_exactly_the_policys_layers(policy, shared):
    """One AdamW step (weight decay: a zero gradient alone would still move a parameter) at depth 2
    of 6: the policy's layers and the head change, every other adapter is bit-identical (spread's
    layers 3 and 4 and bottom's 2..5 lie inside the backward pass: their update is masked). With
    ``shared`` the depth is traced: the same layers, and the static program's step to float rounding."""
    trainable, new, depth = _encoder()[1], _step(policy, shared), 2
    trained = layer_mask(CFG.num_layers, depth, policy)
    for t, ab in trainable["lora"].weights.items():
        for k in ("A", "B"):
            before, after = np.asarray(ab[k]), np.asarray(new["lora"].weights[t][k])
            np.testing.assert_array_equal(after[~trained], before[~trained])
            assert np.all(np.abs(after[trained] - before[trained]).reshape(depth, -1).max(1) > 0), (t, k)
    for a, b in zip(jax.tree.leaves(trainable["head"]), jax.tree.leaves(new["head"])):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0
    if shared:
        for a, b in zip(jax.tree.leaves(_step(policy, False)), jax.tree.leaves(new)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_gradient_runs_down_to_the_lowest_trained_layer():
    """Under ``spread`` at depth 2 of 6 (layers 2 and 5) no gradient reaches layers 0 and 1; layers
    2..5 (the untrained 3 and 4 too) get one. A decoder takes the policy too (the same cut,
    ``lora.depth_cut``): its forward refuses cached layers above the lowest trained one."""
    params, trainable, batch = _encoder()
    model = EncoderModel(CFG, layer_policy="spread")

    def loss(lo):
        return jnp.sum(model.apply(params, batch["input_ids"], batch["attention_mask"], lora=lo, depth=2) ** 2)
    for leaf in jax.tree.leaves(jax.jit(jax.grad(loss))(trainable["lora"])):
        leaf = np.abs(np.asarray(leaf)).reshape(CFG.num_layers, -1).max(1)
        assert np.all(leaf[:2] == 0) and np.all(leaf[2:] > 0), leaf
    sizes = types.SimpleNamespace(vocab_size=40, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=24)
    decoder = dataclasses.replace(tiny_decoder(sizes, max_length=8), layer_policy="spread")
    h0 = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match=r"the lowest trained layer = 1\] \(layer policy 'spread'\)"):
        decoder.hidden_states(None, None, jnp.ones((1, 4), int), depth=2, start_layer=2, hidden0=h0)
    with pytest.raises(ValueError, match="the lowest trained layer = 0"):
        dataclasses.replace(decoder, layer_policy="bottom").hidden_states(None, None, None, depth=2, start_layer=1,
                                                                         hidden0=h0)


# ----------------------------------------------------------------------------
# Layer-wise aggregation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy,want", [
    # group 0 (weight 1, value 1) at depth 2, group 1 (weight 3, value 3) at depth 4; L = 6;
    # a layer both trained: (1 * 1 + 3 * 3) / 4 = 2.5; one: 3; none: the previous -1
    ("top", [-1, -1, 3, 3, 2.5, 2.5]),          # {4, 5} and {2, 3, 4, 5}
    ("bottom", [2.5, 2.5, 3, 3, -1, -1]),       # {0, 1} and {0, 1, 2, 3}
    ("spread", [-1, 3, 2.5, -1, 3, 2.5]),       # {2, 5} and {1, 2, 4, 5}
])
def test_layerwise_aggregate_per_policy(policy, want):
    L = 6
    tree = lambda v: {"lora": LoRA({"query": {"A": jnp.full((L, 3, 1), v), "B": jnp.full((L, 1, 3), v)}}, 1.0),
                      "head": {"w": jnp.full((2,), v)}}
    out = global_aggregate(tree(-1.0), [(tree(1.0), 2, 1.0), (tree(3.0), 4, 3.0)], groups=3, policy=policy)
    for leaf in jax.tree.leaves(out["lora"]):
        np.testing.assert_array_equal(np.asarray(leaf)[:, 0, 0], np.float32(want))
    np.testing.assert_array_equal(np.asarray(out["head"]["w"]), [2.5, 2.5])


# ----------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------


# tests/test_timemodel.py's hand-checked sizes with 4 layers
COST_CFG = dataclasses.replace(CFG, hidden_size=4, num_layers=4, intermediate_size=8)


def test_backward_cost_hand_computed():
    # L=4, H=4, I=8, B=1, T=3 (N=3 tokens), r=1, LoRA on query and value, C=2; mm(m,k,n) = 2mkn.
    cfg = COST_CFG
    # a trained layer with a live input: q and v each frozen dx 96 + dB, dy B^T, dA, dx via A 4 x 24;
    # k dx 96; attention dP, dV, dQ, dK 4 x 72; o dx 96; FFN dx 192 + 192
    live = 192 + 96 + 192 + 288 + 96 + 192 + 192                 # 1248
    # an untrained layer above the lowest trained one: q and v lose dB and dA (2 x 24 each)
    frozen = 144 + 96 + 144 + 288 + 96 + 192 + 192               # 1152
    # the lowest trained layer (dead input): q, v dB, dy B^T, dA (72 each); no k; dP, dV, dQ (3 x 72)
    dead = 72 + 72 + 216 + 96 + 192 + 192                        # 840
    head = 16 + 16 + 32 + 32                                     # classifier dW, dx; dense dW, dx
    assert tm.layer_backward_flops(cfg, 1, 3, 1, ("query", "value"), input_live=True, trained=False) == frozen
    bwd = lambda p: tm.backward_flops(cfg, 1, 3, 2, 1, ("query", "value"), policy=p)
    assert bwd("top") == dead + live + head                      # layers 2, 3: span 2
    assert bwd("spread") == dead + frozen + live + head          # layers 1, 3: span 3 (layer 2 untrained)
    assert bwd("bottom") == dead + live + 2 * frozen + head      # layers 0, 1: span 4
    assert [tm.backward_span(cfg, 2, p) for p in ("top", "spread", "bottom")] == [2, 3, 4]
    # the forward pass is every layer's whatever the policy: 4 x 1008 + the head's 48
    for p in LAYER_POLICIES:
        assert tm.step_flops(cfg, 1, 3, 2, 1, ("query", "value"), policy=p) == 4 * 1008 + 48 + bwd(p)
    # activations for every layer of the backward pass; trainable state for the d trained ones
    mem = {p: tm.memory_breakdown(cfg, 1, 3, 2, 1, ("query", "value"), policy=p) for p in LAYER_POLICIES}
    assert mem["spread"]["activations"] == 1.5 * mem["top"]["activations"] == 0.75 * mem["bottom"]["activations"]
    assert mem["spread"]["adam_state"] == mem["top"]["adam_state"] == mem["bottom"]["adam_state"]


def test_group_cost_uploads_the_trained_layers_and_computes_down_to_the_lowest():
    cfg = COST_CFG
    profiles = {"flops": np.array([1e3, 2e3]), "up_bw": np.array([100.0, 100.0]), "down_bw": np.array([200.0, 200.0]),
                "memory": np.array([1e9, 1e9])}
    work = lambda p: cost_lib.Workload(local_steps=2, batch_size=1, seq_len=3, rank=1, targets=("query", "value"),
                                       edge_cloud_bandwidth=50.0, layer_policy=p)
    ids, ranks = np.array([0, 1]), np.array([1, 1])
    out = {p: cost_lib.group_cost(cfg, profiles, work(p), ids, ranks, 2, 2) for p in LAYER_POLICIES}
    for key in ("bytes_up", "bytes_down", "cloud_bytes_up", "cloud_bytes_down"):
        assert out["top"][key] == out["spread"][key] == out["bottom"][key]   # d = 2 layers either way
    # the slowest device (1e3 FLOP/s) runs 2 steps per intra-round, 2 intra-rounds
    extra = lambda p: 2 * 2 * (tm.step_flops(cfg, 1, 3, 2, 1, ("query", "value"), policy=p)
                               - tm.step_flops(cfg, 1, 3, 2, 1, ("query", "value"))) / 1e3
    for p in ("spread", "bottom"):
        np.testing.assert_allclose(out[p]["time_compute"] - out["top"]["time_compute"], extra(p), rtol=1e-12)
    assert out["top"]["time"] < out["spread"]["time"] < out["bottom"]["time"]


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def test_config_key_and_its_error(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    from hfl_jax.driver import workload
    assert load_config("tests/configs/tiny_v1.yaml").algorithm.layer_policy == "top"
    cfg = load_config("tests/configs/tiny_v1.yaml", ["algorithm.layer_policy=spread"])
    assert workload(cfg).layer_policy == "spread"
    with pytest.raises(ConfigError, match=r"^algorithm.layer_policy: one of top, bottom, spread; got 'middle'$"):
        load_config("tests/configs/tiny_v1.yaml", ["algorithm.layer_policy=middle"])
    with pytest.raises(ValueError, match="layer policy"):
        EncoderModel(CFG, layer_policy="middle")
