"""Device-major data for `vmap`: per-device arrays padded to a common length, a jittable
epoch-style batch sampler, and the padded evaluation set.

Memory: `DeviceData` holds 3 int32 arrays of N_dev * n_max * T entries, i.e.
12 * N_dev * n_max * T bytes, where n_max is the largest device; under strong label or
quantity skew n_max can be many times N / N_dev.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.data.tasks import DataError

_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@flax.struct.dataclass
class DeviceData:
    """Training data of all devices, device axis first, valid rows first on each device.

    Attributes:
      input_ids: int32 [N_dev, n_max, T].
      attention_mask: int32 [N_dev, n_max, T].
      token_type_ids: int32 [N_dev, n_max, T].
      labels: int32 [N_dev, n_max] classes, 0 on padding rows; or (causal LM) [N_dev, n_max, T]
        next-token targets, -100 off the response and on padding rows.
      valid: bool [N_dev, n_max]; True exactly for rows [0, counts[d]) of device d.
      counts: int32 [N_dev], examples per device.
      hidden: optional float32 [N_dev, n_max, T, H], the encoder's hidden states after its
        bottom ``hidden_layer`` layers (``train.cache_frozen_layers``; zeros on padding rows);
        training then starts at layer ``hidden_layer``. ``None``: start from the tokens.
      hidden_layer: static int, 0 when ``hidden`` is None.
    """

    input_ids: jax.Array | np.ndarray
    attention_mask: jax.Array | np.ndarray
    token_type_ids: jax.Array | np.ndarray
    labels: jax.Array | np.ndarray
    valid: jax.Array | np.ndarray
    counts: jax.Array | np.ndarray
    hidden: jax.Array | np.ndarray | None = None
    hidden_layer: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_devices(self) -> int:
        return self.labels.shape[0]

    @property
    def n_max(self) -> int:
        return self.labels.shape[1]

    def row(self, d: int) -> "DeviceData":
        """Device d's slice (no leading device axis), e.g. for `gather_batches`."""
        return jax.tree.map(lambda x: x[d], self)


def make_device_data(tokenized: Mapping[str, np.ndarray], parts: Sequence[np.ndarray],
                     pad_to: int | None = None) -> DeviceData:
    """Lay out tokenized training data device-major (host numpy arrays).

    Args:
      tokenized: `tokenize_dataset` output, arrays [N, T] and labels [N].
      parts: per-device index arrays into the N rows (e.g. from `partition`).
      pad_to: n_max; default the largest device (at least 1 so shapes are never empty).

    Returns:
      `DeviceData` with device d's rows tokenized[parts[d]] at [d, :counts[d]].
    """
    n = len(tokenized["labels"])
    counts = np.array([len(p) for p in parts], dtype=np.int32)
    if len(parts) == 0:
        raise DataError("make_device_data needs at least one device")
    for d, p in enumerate(parts):
        p = np.asarray(p)
        if p.size and (p.min() < 0 or p.max() >= n):
            raise DataError(f"device {d} has indices outside [0, {n})")
    n_max = max(1, int(counts.max()))
    if pad_to is not None:
        if pad_to < n_max:
            raise DataError(f"pad_to={pad_to} is smaller than the largest device ({n_max} rows)")
        n_max = int(pad_to)
    n_dev, t = len(parts), tokenized["input_ids"].shape[1]
    out = {k: np.zeros((n_dev, n_max, t), np.int32) for k in _TOKEN_KEYS}
    tok_labels = np.asarray(tokenized["labels"])   # [N] classes, or [N, T] next-token targets (-100: none)
    labels = np.full((n_dev, n_max, *tok_labels.shape[1:]), 0 if tok_labels.ndim == 1 else -100, np.int32)
    valid = np.zeros((n_dev, n_max), bool)
    for d, p in enumerate(parts):
        p = np.asarray(p, dtype=np.int64)
        for k in _TOKEN_KEYS:
            out[k][d, : p.size] = tokenized[k][p]
        labels[d, : p.size] = tok_labels[p]
        valid[d, : p.size] = True
    return DeviceData(labels=labels, valid=valid, counts=counts, **out)


@functools.partial(jax.jit, static_argnames=("n_max", "num_steps", "batch_size"))
def sample_batch_indices(round_key: jax.Array, device_id: jax.Array | int, count: jax.Array | int,
                         n_max: int, num_steps: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Row indices of `num_steps` (E) minibatches of `batch_size` (B) for one device.

    Epoch-style sampling without replacement: epoch e uses a fresh uniform permutation of
    the device's `count` valid rows [0, count); consecutive steps walk through it and wrap
    into epoch e+1's permutation. Randomness comes only from
    `fold_in(fold_in(fold_in(round_key, device_id), e), row)`, so a device's batches depend
    on (round_key, device_id, count) alone -- not on n_max or on which other devices are
    vmapped alongside.

    Small devices: when 0 < count < B each step is one whole fresh epoch, i.e. the count
    examples in random order followed by B - count masked slots. count == 0 gives all-False
    masks. Masked slots hold index 0 and must be ignored (weight 0 in the loss).

    Cost: E * n_max hashes and E sorts of n_max per device.

    Args:
      round_key: PRNG key of the round (shared by all devices).
      device_id: int32 scalar, the device's global id.
      count: int32 scalar, its number of valid rows (<= n_max).
      n_max, num_steps, batch_size: static ints.

    Returns:
      idx: int32 [E, B] row indices in [0, count); mask: bool [E, B].
    """
    key = jax.random.fold_in(round_key, device_id)
    count = jnp.clip(jnp.asarray(count, jnp.int32), 0, n_max)
    rows = jnp.arange(n_max, dtype=jnp.int32)
    epochs = jnp.arange(num_steps, dtype=jnp.int32)

    def epoch_perm(e: jax.Array) -> jax.Array:
        ke = jax.random.fold_in(key, e)
        bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(ke, r), dtype=jnp.uint32))(rows)
        # padding rows sort last; the stable sort keeps valid rows before them on ties
        bits = jnp.where(rows < count, bits, jnp.array(0xFFFFFFFF, jnp.uint32))
        return jnp.argsort(bits, stable=True).astype(jnp.int32)

    perms = jax.vmap(epoch_perm)(epochs)                   # [E, n_max]
    per_step = jnp.minimum(count, batch_size)              # real examples per step
    slot = jnp.arange(batch_size, dtype=jnp.int32)
    t = epochs[:, None] * per_step + slot[None, :]         # position in the epoch stream
    safe = jnp.maximum(count, 1)
    mask = jnp.broadcast_to((slot < per_step) & (count > 0), (num_steps, batch_size))
    epoch = jnp.minimum(t // safe, num_steps - 1)          # <= E-1 wherever mask is True
    idx = jnp.where(mask, perms[epoch, t % safe], 0)
    return idx.astype(jnp.int32), mask


def gather_batches(device_data_row: DeviceData, idx: jax.Array) -> dict[str, jax.Array]:
    """Gather minibatches from one device's rows.

    Args:
      device_data_row: a `DeviceData` without the device axis (`dd.row(d)` or inside vmap).
      idx: int32 [E, B] from `sample_batch_indices`.

    Returns:
      dict input_ids / attention_mask / token_type_ids [E, B, T] and labels [E, B] (and
      hidden [E, B, T, H] when the data carries cached hidden states). Pair it with the
      sampler's mask; masked slots hold row 0's data.
    """
    take = lambda x: jnp.take(jnp.asarray(x), idx, axis=0)  # noqa: E731
    out = {"input_ids": take(device_data_row.input_ids),
           "attention_mask": take(device_data_row.attention_mask),
           "token_type_ids": take(device_data_row.token_type_ids),
           "labels": take(device_data_row.labels)}
    if device_data_row.hidden is not None:
        out["hidden"] = take(device_data_row.hidden)
    return out


@flax.struct.dataclass
class EvalBatches:
    """The evaluation set padded to a whole number of batches of size B.

    Attributes:
      input_ids, attention_mask, token_type_ids: int32 [num_batches, B, T].
      labels: int32 [num_batches, B]; 0 on padding.
      valid: bool [num_batches, B]; False on the padding that fills the last batch.
      hidden, hidden_layer: optional cached hidden states [num_batches, B, T, H] after the
        bottom ``hidden_layer`` layers, as in :class:`DeviceData`.
    Iterating yields one dict per batch (the token keys, labels and valid, leading axis dropped).
    """

    input_ids: jax.Array | np.ndarray
    attention_mask: jax.Array | np.ndarray
    token_type_ids: jax.Array | np.ndarray
    labels: jax.Array | np.ndarray
    valid: jax.Array | np.ndarray
    hidden: jax.Array | np.ndarray | None = None
    hidden_layer: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_batches(self) -> int:
        return self.labels.shape[0]

    @property
    def num_examples(self) -> int:
        return int(np.asarray(self.valid).sum())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, jax.Array | np.ndarray]]:
        for b in range(self.num_batches):
            yield {k: getattr(self, k)[b] for k in (*_TOKEN_KEYS, "labels", "valid")}


def eval_batches(tokenized: Mapping[str, np.ndarray], batch_size: int) -> EvalBatches:
    """Pad N up to a multiple of `batch_size` and reshape to [N_pad / B, B, ...]."""
    if batch_size < 1:
        raise DataError(f"eval batch_size must be >= 1, got {batch_size}")
    n = len(tokenized["labels"])
    if n == 0:
        raise DataError("the evaluation set is empty")
    nb = -(-n // batch_size)
    pad = nb * batch_size - n

    def fix(x: np.ndarray, dtype: type) -> np.ndarray:
        x = np.asarray(x, dtype)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), dtype)])
        return x.reshape(nb, batch_size, *x.shape[1:])

    return EvalBatches(
        labels=fix(tokenized["labels"], np.int32),
        valid=fix(np.ones(n, bool), bool),
        **{k: fix(tokenized[k], np.int32) for k in _TOKEN_KEYS})


def bucket_length(attention_mask: np.ndarray, buckets: Sequence[int] | int = 8) -> int:
    """The smallest bucket ``>=`` the last real (mask 1) position + 1 over all rows of ``attention_mask``.

    ``buckets``: an int ``m`` (lengths rounded up to a multiple of ``m``) or an explicit
    ascending list of lengths. Never more than the current length ``T``; at least 1.
    """
    mask = np.asarray(attention_mask)
    t = mask.shape[-1]
    cols = np.flatnonzero(mask.reshape(-1, t).any(0))
    need = int(cols[-1]) + 1 if cols.size else 1
    if isinstance(buckets, (int, np.integer)):
        if buckets < 1:
            raise DataError(f"length bucket multiple must be >= 1, got {buckets}")
        length = -(-need // int(buckets)) * int(buckets)
    else:
        length = next((int(b) for b in sorted(buckets) if b >= need), t)
    return max(1, min(length, t))


def trim_padding(data, buckets: Sequence[int] | int = 8):
    """``data`` (:class:`DeviceData` or :class:`EvalBatches`, host arrays) with the token axis cut to
    :func:`bucket_length` of its attention mask.

    Exact for every supported model: only trailing positions where *every* row is padding
    are dropped; those are masked out as keys, their own outputs are never read (heads pool
    token 0; a decoder's labels there are -100 and are cut alike), absolute positions count from the start and DeBERTa's relative positions
    depend on ``i - j`` only. Cached ``hidden`` states are cut alike.
    """
    t = np.asarray(data.attention_mask).shape[-1]
    length = bucket_length(data.attention_mask, buckets)
    if length == t:
        return data
    cut = {k: np.asarray(getattr(data, k))[..., :length] for k in _TOKEN_KEYS}
    if np.ndim(data.labels) == np.ndim(data.attention_mask):   # per-token labels (causal LM)
        cut["labels"] = np.asarray(data.labels)[..., :length]
    if data.hidden is not None:
        cut["hidden"] = np.asarray(data.hidden)[..., :length, :]
    return data.replace(**cut)
