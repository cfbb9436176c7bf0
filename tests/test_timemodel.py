"""Hand-computed checks of the device profiles and the FLOP/byte/second cost model."""

import dataclasses

import numpy as np
import pytest

from hfl_jax.fed import timemodel as tm
from hfl_jax.fed.profiles import (TIERS, DeviceProfile, draw_profiles, load_profiles,
                                  profiles_to_arrays)


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Stand-in for EncoderConfig with only the fields the time model reads."""

    model_type: str = "bert"
    hidden_size: int = 4
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 8
    num_labels: int = 2
    vocab_size: int = 10
    max_position_embeddings: int = 6


TINY = Cfg()


# ----------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------


def test_step_flops_hand_computed():
    # L=2, H=4, I=8, heads=2, B=1, T=3 (N=3 tokens), r=1, LoRA on query and value, C=2.
    qkvo = 4 * (2 * 3 * 4 * 4)             # 384: four H->H projections
    scores = 2 * 1 * 3 * 3 * 4             # 72: Q K^T summed over heads (= A V)
    ffn = 2 * (2 * 3 * 4 * 8)              # 384
    lora = 2 * (2 * 3 * 4 * 1 + 2 * 3 * 1 * 4)  # 96: x@A and (xA)@B for q and v
    layer_fwd = qkvo + 2 * scores + ffn + lora  # 1008
    head_fwd = 2 * 1 * 4 * 4 + 2 * 1 * 4 * 2   # 48: pooler + classifier
    fwd = 2 * layer_fwd + head_fwd             # 2064
    assert tm.forward_flops(TINY, 1, 3, 1) == fwd

    lora_bwd_no_dx = 3 * (2 * 3 * 1 * 4)   # dB, dy B^T, dA (input is not live) = 72
    # Lowest trained layer: x is stop_gradient'ed, so no dx for the q/k/v
    # projections, K has no gradient at all; dP, dV, dQ are needed.
    bottom = 2 * lora_bwd_no_dx + 3 * scores + (2 * 3 * 4 * 4) + ffn  # 72+72+216+96+384 = 840
    # A layer with a live input: dx of all six projections, four attention
    # products, and LoRA twice its forward.
    upper = (qkvo + ffn) + 4 * scores + 2 * lora  # 768 + 288 + 192 = 1248
    head_w = 2 * 1 * 4 * 4 + 2 * 1 * 4 * 2     # dW of pooler and classifier = 48
    head_dx_cls = 2 * 1 * 2 * 4                # classifier dx = 16 (pooler is trained)
    head_dx_pool = 2 * 1 * 4 * 4               # pooler dx, only if the encoder is trained = 32

    assert tm.step_flops(TINY, 1, 3, 0, 1) == fwd + head_w + head_dx_cls == 2128
    assert tm.step_flops(TINY, 1, 3, 1, 1) == fwd + bottom + head_w + head_dx_cls + head_dx_pool == 3000
    assert tm.step_flops(TINY, 1, 3, 2, 1) == fwd + bottom + upper + head_w + head_dx_cls + head_dx_pool == 4248


@pytest.mark.parametrize("model_type", ["bert", "roberta", "deberta", "deberta-v2"])
def test_step_flops_grow_strictly_with_depth(model_type):
    cfg = Cfg(model_type=model_type, num_layers=4)
    flops = [tm.step_flops(cfg, 2, 5, d, 2) for d in range(cfg.num_layers + 1)]
    assert all(a < b for a, b in zip(flops, flops[1:]))
    assert flops[0] > tm.forward_flops(cfg, 2, 5, 2)  # the head is always trained


def test_step_flops_rejects_bad_depth_and_targets():
    for depth in (-1, TINY.num_layers + 1, 1.5):
        with pytest.raises(ValueError, match="depth"):
            tm.step_flops(TINY, 1, 3, depth, 1)
    with pytest.raises(ValueError, match="targets"):
        tm.step_flops(TINY, 1, 3, 1, 1, targets=("qkv",))
    with pytest.raises(ValueError, match="model_type"):
        tm.step_flops(Cfg(model_type="gpt2"), 1, 3, 1, 1)


def test_deberta_span_and_extra_cost():
    v1 = Cfg(model_type="deberta")
    v2 = Cfg(model_type="deberta-v2")
    assert tm.relative_span(v1, 3) == 3                       # min(T, max_position_embeddings)
    assert tm.relative_span(v2, 3) == 6                       # max_position_embeddings, independent of T
    assert tm.relative_span(TINY, 3) == 0
    # v1 (no shared keys): per layer, per c2p/p2c, 2S-row projection + [N,H]x[H,2S]
    extra = 2 * (2 * 6 * 4 * 4 + 2 * 3 * 4 * 6)
    assert tm.forward_flops(v1, 1, 3, 1) - tm.forward_flops(TINY, 1, 3, 1) == 2 * extra


def _dot_flops(jaxpr, jax_core):
    """2*m*k*n summed over every dot_general in a jaxpr (sub-jaxprs times their scan length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
        reps = eqn.params.get("length", 1)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    total += reps * _dot_flops(sub.jaxpr, jax_core)
                elif isinstance(sub, jax_core.Jaxpr):
                    total += reps * _dot_flops(sub, jax_core)
    return total


def _reference_loss(cfg, targets, seq_len):
    """A plain JAX encoder (BERT, or DeBERTa-v2 with shared keys) with depth via stop_gradient."""
    import jax
    import jax.numpy as jnp

    H, L, nh = cfg.hidden_size, cfg.num_layers, cfg.num_heads
    deberta = cfg.model_type == "deberta-v2"
    S = tm.relative_span(cfg, seq_len)
    key = jax.random.PRNGKey(0)
    base = [{t: jax.random.normal(jax.random.fold_in(key, 8 * l + i), tm.target_dims(cfg, t))
             for i, t in enumerate(tm.TARGET_NAMES)} for l in range(L)]
    rel = jnp.ones((2 * S, H))
    idx = jnp.clip(jnp.arange(seq_len)[:, None] - jnp.arange(seq_len)[None, :] + S, 0, 2 * S - 1)

    def proj(x, l, t, lora):
        y = x @ base[l][t]
        if t in lora:
            y = y + (x @ lora[t][0]) @ lora[t][1] * 0.5
        return y

    def layer(x, l, lora):
        heads = lambda z: z.reshape(z.shape[:-1] + (nh, H // nh))
        q, k, v = (heads(proj(x, l, t, lora)) for t in ("query", "key", "value"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if deberta:
            gather = lambda a: jnp.take_along_axis(a, jnp.broadcast_to(idx, a.shape[:2] + idx.shape), -1)
            s = s + gather(jnp.einsum("bqhd,phd->bhqp", q, heads(proj(rel, l, "key", lora))))
            s = s + jnp.swapaxes(gather(jnp.einsum("bkhd,phd->bhkp", k, heads(proj(rel, l, "query", lora)))), -1, -2)
        c = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(x.shape)
        h1 = jax.nn.standardize(proj(c, l, "attention_output", lora) + x)
        return jax.nn.standardize(proj(jax.nn.gelu(proj(h1, l, "intermediate", lora)), l, "output", lora) + h1)

    def loss(lora, head, x, depth):
        h = x
        for l in range(L - depth):
            h = layer(h, l, lora[l])
        h = jax.lax.stop_gradient(h)
        for l in range(L - depth, L):
            h = layer(h, l, lora[l])
        return jnp.sum(jax.nn.log_softmax(jnp.tanh(h[:, 0] @ head[0]) @ head[1]))

    return loss


@pytest.mark.parametrize("model_type,targets", [
    ("bert", ("query", "value")),
    ("bert", ("key", "intermediate")),
    ("bert", tm.TARGET_NAMES),
    ("deberta-v2", ("query", "value")),
    ("deberta-v2", ("key", "attention_output")),
])
def test_step_flops_equal_jax_matmul_count(model_type, targets):
    """step_flops == the dot_general FLOPs JAX emits for value_and_grad at each depth."""
    jax = pytest.importorskip("jax")
    import jax.extend.core as jax_core
    import jax.numpy as jnp

    cfg = Cfg(model_type=model_type, hidden_size=8, intermediate_size=16, num_layers=3, num_labels=3,
              max_position_embeddings=4)
    B, T, r = 2, 5, 2
    loss = _reference_loss(cfg, targets, T)
    lora = [{t: (jnp.ones((tm.target_dims(cfg, t)[0], r)), jnp.ones((r, tm.target_dims(cfg, t)[1])))
             for t in targets} for _ in range(cfg.num_layers)]
    head = (jnp.ones((8, 8)), jnp.ones((8, 3)))
    x = jnp.ones((B, T, 8))
    for d in range(cfg.num_layers + 1):
        grad_fn = lambda lo, he: jax.value_and_grad(loss, argnums=(0, 1))(lo, he, x, d)
        jaxpr = jax.make_jaxpr(grad_fn)(lora, head).jaxpr
        assert _dot_flops(jaxpr, jax_core) == tm.step_flops(cfg, B, T, d, r, targets), d
    fwd = jax.make_jaxpr(lambda lo, he: loss(lo, he, x, 0))(lora, head).jaxpr
    assert _dot_flops(fwd, jax_core) == tm.forward_flops(cfg, B, T, r, targets)


# ----------------------------------------------------------------------------
# Bytes and memory
# ----------------------------------------------------------------------------


def test_lora_and_head_bytes_hand_computed():
    # q and v: A [4,1] + B [1,4] each -> 16 params per layer -> 64 bytes.
    assert tm.lora_param_count(TINY, 2, 1) == 32
    assert tm.lora_bytes(TINY, 1, 1) == 64.0
    assert tm.lora_bytes(TINY, 2, 1) == 128.0
    assert tm.lora_bytes(TINY, np.array([True, False]), 1) == 64.0
    np.testing.assert_array_equal(tm.lora_bytes(TINY, np.array([0, 1, 2]), 1), [0.0, 64.0, 128.0])
    # intermediate H->I and output I->H at r=2: 2*(4+8) + 2*(8+4) = 48 params per layer.
    assert tm.lora_bytes(TINY, 1, 2, ("intermediate", "output"), bytes_per_param=2) == 96.0
    # head: pooler 4*4+4, classifier 4*2+2 = 30 params.
    assert tm.head_bytes(TINY) == 120.0
    assert tm.head_bytes(TINY, num_labels=3) == 4 * (20 + 12 + 3)
    with pytest.raises(ValueError):
        tm.lora_bytes(TINY, 3, 1)
    with pytest.raises(ValueError):
        tm.lora_bytes(TINY, np.array([True, False, True]), 1)


def test_memory_grows_with_depth_and_batch():
    cfg = Cfg(num_layers=4)
    by_depth = [tm.memory_needed(cfg, 2, 5, d, 2) for d in range(5)]
    assert all(a < b for a, b in zip(by_depth, by_depth[1:]))
    assert tm.memory_needed(cfg, 4, 5, 2, 2) > tm.memory_needed(cfg, 2, 5, 2, 2)
    parts = tm.memory_breakdown(TINY, 1, 3, 1, 1)
    trainable = 16 + 30  # one layer of q/v LoRA + head
    assert parts["gradients"] == 4 * trainable
    assert parts["adam_state"] == 8 * trainable
    assert parts["lora_weights"] == 4 * 32
    # per layer: 3 tokens * (8*4 + 2*8 + 1*2) + 1*2 heads*3*3*2 = 150 + 36 floats
    assert parts["activations"] == parts["working_set"] == 4 * 186
    assert tm.memory_needed(TINY, 1, 3, 1, 1) == sum(parts.values())


# ----------------------------------------------------------------------------
# Seconds
# ----------------------------------------------------------------------------


def test_doubling_bandwidth_halves_comm_time():
    p = DeviceProfile("d", flops=1e9, up_bw=1e6, down_bw=4e6, memory=1e9)
    fast = dataclasses.replace(p, up_bw=2e6, down_bw=8e6)
    assert tm.comm_time(3e6, 8e6, p) == pytest.approx(3.0 + 2.0)
    assert tm.comm_time(3e6, 8e6, fast) == pytest.approx(tm.comm_time(3e6, 8e6, p) / 2)
    assert tm.compute_time(5e9, p) == pytest.approx(5.0)
    arrays = profiles_to_arrays([p, fast])
    np.testing.assert_allclose(tm.comm_time(3e6, 8e6, arrays), [5.0, 2.5])


def test_device_round_time_hand_computed():
    profs = [DeviceProfile("a", 1000.0, 64.0, 128.0, 1e9), DeviceProfile("b", 2000.0, 32.0, 128.0, 1e9)]
    got = tm.device_round_time(TINY, profs, local_steps=2, batch_size=1, seq_len=3, depth=np.array([1, 2]), rank=1)
    # device a: 2 steps * 3000 FLOPs / 1000 + (64 + 120) B up / 64 + (64 + 120) B down / 128
    # device b: 2 steps * 4248 FLOPs / 2000 + (128 + 120) / 32 + (128 + 120) / 128
    np.testing.assert_allclose(got, [6.0 + 184 / 64 + 184 / 128, 4.248 + 248 / 32 + 248 / 128])
    single = tm.device_round_time(TINY, profs[0], local_steps=2, batch_size=1, seq_len=3, depth=1, rank=1,
                                  down_layers=2)
    assert single == pytest.approx(6.0 + 184 / 64 + 248 / 128)


def test_slowest_device_sets_group_time():
    assert tm.group_round_time([1.0, 7.0, 3.0]) == 7.0
    assert tm.group_round_time([1.0, 7.0, 3.0], mask=[True, False, True]) == 3.0
    assert tm.group_round_time([]) == 0.0
    assert tm.group_round_time([2.0], mask=[False]) == 0.0
    groups = np.array([[1.0, 5.0], [4.0, 2.0]])
    np.testing.assert_array_equal(tm.group_round_time(groups), [5.0, 4.0])
    assert tm.global_round_time(tm.group_round_time(groups)) == 5.0
    assert tm.global_round_time([]) == 0.0
    with pytest.raises(ValueError):
        tm.group_round_time([-1.0])


# ----------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------


def test_draw_profiles_deterministic_and_jittered():
    a = draw_profiles(50, seed=3)
    assert a == draw_profiles(50, seed=3)
    assert a != draw_profiles(50, seed=4)
    assert {p.name for p in a} <= set(TIERS)
    for p in a:
        t = TIERS[p.name]
        assert (p.flops, p.memory) == (t.flops, t.memory)
        assert 0.5 * t.up_bw <= p.up_bw <= 1.5 * t.up_bw
    only_orin = draw_profiles(10, tiers={"tx2": 0.0, "orin": 1.0}, seed=0, bandwidth_jitter=0.0)
    assert only_orin == [TIERS["orin"]] * 10
    arrays = profiles_to_arrays(a)
    assert arrays["flops"].shape == (50,) and arrays["name"].shape == (50,)
    assert draw_profiles(0) == []


def test_draw_profiles_errors():
    with pytest.raises(ValueError, match="unknown device tier"):
        draw_profiles(3, tiers=("tx2", "h100"))
    with pytest.raises(ValueError, match="jitter"):
        draw_profiles(3, bandwidth_jitter=1.0)
    with pytest.raises(ValueError, match="weights"):
        draw_profiles(3, tiers={"tx2": -1.0})


def test_profile_validation():
    for bad in (0.0, -1.0, float("nan"), "fast"):
        with pytest.raises(ValueError, match="flops"):
            DeviceProfile("x", flops=bad, up_bw=1.0, down_bw=1.0, memory=1.0)


def test_load_yaml_list_and_counts(tmp_path):
    listed = tmp_path / "p.yaml"
    listed.write_text(
        "- {name: fast, flops: 2.0e12, up_bw: 1.0e7, down_bw: 2.0e7, memory: 8.0e9}\n"
        "- {tier: tx2, count: 2, up_bw: 5.0e5}\n"
    )
    ps = load_profiles(listed)
    assert [p.name for p in ps] == ["fast", "tx2", "tx2"]
    assert ps[0].flops == 2e12 and ps[1].up_bw == 5e5 and ps[1].flops == TIERS["tx2"].flops

    counted = tmp_path / "c.yml"
    counted.write_text("tiers:\n  slow: {flops: 1.0e11, up_bw: 1.0e6, down_bw: 2.0e6, memory: 4.0e9}\n"
                       "counts: {slow: 2, orin: 1}\n")
    ps = load_profiles(counted)
    assert [p.name for p in ps] == ["slow", "slow", "orin"] and ps[0].flops == 1e11


def test_load_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("name,flops,up_bw,down_bw,memory\na,1e12,1e6,2e6,4e9\nb,2e12,3e6,4e6,8e9\n")
    ps = load_profiles(path)
    assert ps == [DeviceProfile("a", 1e12, 1e6, 2e6, 4e9), DeviceProfile("b", 2e12, 3e6, 4e6, 8e9)]


def test_load_errors(tmp_path):
    cases = {
        "missing.csv": ("name,flops,up_bw,memory\na,1,1,1\n", "missing CSV columns"),
        "neg.csv": ("name,flops,up_bw,down_bw,memory\na,1e12,-1,2e6,4e9\n", "line 2.*up_bw"),
        "zero.yaml": ("- {name: a, flops: 0, up_bw: 1, down_bw: 1, memory: 1}\n", "flops"),
        "tier.yaml": ("- {tier: jetson_nano}\n", "unknown device tier"),
        "field.yaml": ("- {name: custom, flops: 1.0}\n", "missing fields"),
        "counts.yaml": ("counts: {tx3: 1}\n", "unknown device tier"),
        "p.json": ("[]", "unsupported"),
    }
    for name, (text, match) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_profiles(path)
