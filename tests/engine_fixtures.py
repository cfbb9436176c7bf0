"""Shared tiny model and synthetic federated data for engine tests (also run in subprocesses)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfl_jax.data import make_device_data
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora

CFG = EncoderConfig(model_type="bert", vocab_size=40, hidden_size=16, num_layers=3, num_heads=2,
                    intermediate_size=24, max_position_embeddings=16, num_labels=2)
T = 8


def setup(num_devices=8, seed=0):
    """(model, params, trainable, device_data, sizes) with devices of very different sizes."""
    model = EncoderModel(CFG)
    params = model.init(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    n = 200
    ids = rng.integers(1, CFG.vocab_size, (n, T))
    lens = rng.integers(2, T + 1, n)
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    labels = (ids[:, 0] % 2).astype(np.int64)
    tok = {"input_ids": (ids * mask).astype(np.int32), "attention_mask": mask,
           "token_type_ids": np.zeros((n, T), np.int32), "labels": labels}
    sizes = [1, 3, 5, 9, 13, 17, 21, 30][:num_devices]
    starts = np.cumsum([0] + sizes[:-1])
    parts = [np.arange(s, s + k) for s, k in zip(starts, sizes)]
    data = make_device_data(tok, parts)
    lora = init_lora(jax.random.PRNGKey(1), CFG, LoRAConfig(rank=2, alpha=4))
    trainable = {"lora": lora, "head": params["head"]}
    return model, params, trainable, data, np.array(sizes, np.float32)


OPT = optax.adam(1e-2)
