"""Peak memory of a group round grows with the number of simulated devices only by per-device state.

XLA's compiled memory analysis of ``make_group_round`` for M = 1, 4, 16 devices
on a BERT whose frozen base (a big word-embedding table) dwarfs its adapters:

* argument bytes grow by exactly the per-device inputs (data rows, id, weight) --
  the base is one argument, broadcast, never stacked per device;
* output bytes grow by the per-device metrics only (the trainable is aggregated
  in the call);
* temporary bytes grow by the per-device adapters, gradients, Adam moments and
  activations: far below the base size per device, and the same for a 8x larger
  vocabulary (a copy of the base per device would scale with it);
* chunking (``DeviceAxis(chunk_size=4)``) keeps M = 16 near the M = 4 footprint.

Everything is lowered from abstract shapes (nothing is allocated). The printed
table (``pytest -s``) is the benchmark record.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfl_jax.data import make_device_data
from hfl_jax.fed import timemodel
from hfl_jax.fed.device_axis import DeviceAxis
from hfl_jax.fed.engine import make_group_round
from hfl_jax.fed.local import base_of
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora

T, N_MAX, E, B, RANK = 8, 8, 3, 4, 2
DEVICES = (1, 4, 16)


def _cfg(vocab):
    return EncoderConfig(model_type="bert", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_position_embeddings=16, num_labels=2)


def _nbytes(tree):
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _data(m):
    n = m * N_MAX
    tok = {"input_ids": np.ones((n, T), np.int32), "attention_mask": np.ones((n, T), np.int32),
           "token_type_ids": np.zeros((n, T), np.int32), "labels": np.zeros(n, np.int32)}
    return make_device_data(tok, [np.arange(d * N_MAX, (d + 1) * N_MAX) for d in range(m)])


@functools.lru_cache(maxsize=None)
def _analyse(vocab, m, axis=DeviceAxis()):
    """(memory stats, base bytes, trainable bytes, per-device input bytes) of one compiled group round."""
    cfg = _cfg(vocab)
    model = EncoderModel(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    lora = jax.eval_shape(lambda: init_lora(jax.random.PRNGKey(1), cfg, LoRAConfig(rank=RANK, alpha=4)))
    trainable, base = {"lora": lora, "head": params["head"]}, base_of(params)
    data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _data(m))
    ids, weights = jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m,), jnp.float32)
    group_round = make_group_round(model, optax.adam(1e-2), depth=cfg.num_layers, local_steps=E, batch_size=B,
                                   n_max=N_MAX, axis=axis)
    stats = group_round.lower(trainable, base, data, ids, weights, jax.random.PRNGKey(0)).compile().memory_analysis()
    per_device_in = _nbytes(data) // m + 4 + 4  # data rows + device id + weight
    return stats, _nbytes(base), _nbytes(trainable), per_device_in


def _growth(a, b, ma, mb, field):
    return (getattr(b, field) - getattr(a, field)) / (mb - ma)


def test_memory_grows_per_device_by_adapter_optimizer_and_activations_only():
    vocab = 65536
    runs = {m: _analyse(vocab, m) for m in DEVICES}
    base_bytes, trainable_bytes, per_device_in = runs[1][1:]
    stats = {m: r[0] for m, r in runs.items()}
    print(f"\nBERT H=32 L=2 I=64 vocab={vocab}, rank {RANK}, Adam, depth 2, E={E} B={B} T={T} n_max={N_MAX}")
    print(f"base {base_bytes} B, trainable (adapters + head) {trainable_bytes} B, per-device inputs "
          f"{per_device_in} B")
    print(f"{'M':>3} {'argument':>10} {'output':>8} {'temp':>10}")
    for m, s in stats.items():
        print(f"{m:>3} {s.argument_size_in_bytes:>10} {s.output_size_in_bytes:>8} {s.temp_size_in_bytes:>10}")

    arg = [_growth(stats[a], stats[b], a, b, "argument_size_in_bytes") for a, b in ((1, 4), (4, 16))]
    out = [_growth(stats[a], stats[b], a, b, "output_size_in_bytes") for a, b in ((1, 4), (4, 16))]
    temp = [_growth(stats[a], stats[b], a, b, "temp_size_in_bytes") for a, b in ((1, 4), (4, 16))]
    est = timemodel.memory_needed(_cfg(vocab), B, T, 2, RANK) - timemodel.memory_breakdown(
        _cfg(vocab), B, T, 2, RANK)["base_weights"]
    print(f"per added device: argument {arg[1]:.0f} B, output {out[1]:.0f} B, temp {temp[1]:.0f} B "
          f"({temp[1] / base_bytes:.2%} of base); time model's non-base estimate {est:.0f} B")

    # arguments: exactly linear, at most the per-device inputs (jit prunes inputs it does not read)
    assert arg[0] == arg[1] and 0 < arg[1] <= per_device_in
    # outputs: per-device metrics only (loss, count [E] f32, finite bool, weight f32), not a trainable copy
    assert out[0] == out[1] == 4 * E * 2 + 1 + 4
    # temporaries: per-device state, far below a copy of the base
    assert all(0 < t < 0.10 * base_bytes for t in temp)
    assert all(t + o < 0.10 * base_bytes for t, o in zip(temp, out))
    assert temp[1] > 4 * trainable_bytes  # adapters + grads + two Adam moments + activations are in there


def test_per_device_growth_does_not_depend_on_base_size():
    small, big = 8192, 65536
    growth = {}
    for vocab in (small, big):
        (s1, base_bytes, _, _), (s4, _, _, _) = _analyse(vocab, 1), _analyse(vocab, 4)
        growth[vocab] = (_growth(s1, s4, 1, 4, "temp_size_in_bytes"), base_bytes)
        print(f"\nvocab {vocab}: base {base_bytes} B, temp per added device {growth[vocab][0]:.0f} B")
    assert growth[big][1] > 7 * growth[small][1]
    assert abs(growth[big][0] - growth[small][0]) <= 0.02 * growth[small][0]


def test_chunking_bounds_temp_memory():
    plain = _analyse(65536, 16)[0].temp_size_in_bytes
    chunked = _analyse(65536, 16, DeviceAxis(chunk_size=4))[0].temp_size_in_bytes
    four = _analyse(65536, 4)[0].temp_size_in_bytes
    print(f"\nM=16 temp: vmapped {plain} B, chunk_size=4 {chunked} B; M=4 vmapped {four} B")
    assert chunked < 0.5 * plain
    assert chunked < 1.5 * four
