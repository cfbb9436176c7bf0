"""Sequence packing: several short sequences share one row, so a step pays for real tokens.

A padded batch ``[B, T]`` of SST-2 sentences is mostly padding (mean 13 real tokens of T = 32 in
the CPU study), and under ``vmap`` every device's batch must have the same shape, so padding each
step to its longest sequence saves nothing (some device's batch nearly always holds a sequence
of length T). Packing keeps the shapes static and drops the padding instead: each device-step's
``B`` sequences are placed, first-fit decreasing, into ``R`` rows of ``L`` tokens
(``R * L`` about the real tokens, not ``B * T``); the host plans the placement from the
sequence lengths, the jitted step scatters the tokens.

Exact up to float reordering: a token attends only to tokens of its own sequence (block-diagonal
mask from segment ids), its position ids restart at each sequence's start (absolute positions
as unpacked), every dense layer and LayerNorm acts per token, and the head reads each sequence's
first token. Which rows of the data a step uses is unchanged (the same sampler, run ahead on
the host).

Layout of one packed batch (one device-step, or one evaluation batch)::

    input_ids, token_type_ids, position_ids: int32 [R, L]
    segment_ids: int32 [R, L]   # 1 + slot of the sequence a token belongs to; 0 = padding
    slots: int32 [B]            # flat index row * L + offset of each sequence's first token
    labels: int32 [B]; mask: bool [B]

Only BERT/RoBERTa-family encoders with the einsum or XLA attention path take packed batches
(:attr:`hfl_jax.models.EncoderModel.packs`); DeBERTa's relative attention and cuDNN's key-length
mask do not.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.data.device_data import sample_batch_indices

Array = jax.Array


class PackSpec(NamedTuple):
    """The static shape of packed batches (hashable: part of a compiled program's cache key)."""
    rows: int              # R rows per batch
    row_len: int           # L tokens per row (>= the data's T)
    position_offset: int   # position id of a sequence's first token (RoBERTa: pad_token_id + 1)


def position_offset(model_cfg) -> int:
    """The position id of a sequence's first token, as the model config numbers positions
    (``model_cfg.position_offset``: RoBERTa counts from ``pad_token_id + 1``, BERT and the decoders
    from 0)."""
    return model_cfg.position_offset


def first_fit_decreasing(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Places sequences of ``lengths`` ``[B]`` (each ``<= row_len``; 0 = nothing to place) in rows
    of ``row_len`` tokens, longest first, each into the first row with room.

    Returns ``(row [B], offset [B], rows used)``; zero-length slots get row 0, offset 0.
    Deterministic (a stable sort on the lengths).
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > row_len:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit a row of {row_len}")
    row, offset = np.zeros(len(lengths), np.int32), np.zeros(len(lengths), np.int32)
    fill: list[int] = []
    for b in np.argsort(-lengths, kind="stable"):
        n = int(lengths[b])
        if n == 0:
            continue
        r = next((i for i, f in enumerate(fill) if f + n <= row_len), len(fill))
        if r == len(fill):
            fill.append(0)
        row[b], offset[b] = r, fill[r]
        fill[r] += n
    return row, offset, max(1, len(fill))


def plan_packing(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`first_fit_decreasing` for every batch of ``lengths`` ``[..., B]``: ``(row [..., B],
    offset [..., B], R)`` with ``R`` the most rows any batch needs (the common static row count)."""
    lengths = np.asarray(lengths)
    flat = lengths.reshape(-1, lengths.shape[-1])
    plans = [first_fit_decreasing(x, row_len) for x in flat]
    row = np.stack([p[0] for p in plans]).reshape(lengths.shape)
    offset = np.stack([p[1] for p in plans]).reshape(lengths.shape)
    return row, offset, max(p[2] for p in plans)


def pack_batch(batch: Mapping[str, Array], row: Array, offset: Array, spec: PackSpec) -> dict[str, Array]:
    """One padded batch (``input_ids``/``attention_mask``/``token_type_ids`` ``[B, T]``, ``labels``,
    ``mask`` ``[B]``) laid out in ``spec.rows`` rows of ``spec.row_len`` by the plan ``row``/``offset``
    ``[B]`` (jittable; sequences must be right-padded). Returns the packed layout of the module doc;
    per-token ``labels`` ``[B, T]`` (causal LM) come back scattered ``[R, L]``, ``-100`` off the
    real tokens of masked-in sequences."""
    R, L = spec.rows, spec.row_len
    B, T = batch["input_ids"].shape
    lengths = (batch["attention_mask"] > 0).sum(-1) * batch["mask"]
    pos = jnp.arange(T, dtype=jnp.int32)
    start = row.astype(jnp.int32) * L + offset.astype(jnp.int32)
    dest = jnp.where(pos[None, :] < lengths[:, None], start[:, None] + pos[None, :], R * L).reshape(-1)

    def scatter(values):   # [B, T] -> [R, L]; padding tokens (dest R * L) are dropped
        return jnp.zeros(R * L, jnp.int32).at[dest].set(values.reshape(-1).astype(jnp.int32),
                                                         mode="drop").reshape(R, L)
    slot = jnp.arange(1, B + 1, dtype=jnp.int32)
    labels = batch["labels"]
    if labels.ndim == 2:   # per-token labels (causal LM): scattered like the tokens, -100 elsewhere
        labels = jnp.full(R * L, -100, jnp.int32).at[dest].set(labels.reshape(-1).astype(jnp.int32),
                                                                mode="drop").reshape(R, L)
    return {"input_ids": scatter(batch["input_ids"]), "token_type_ids": scatter(batch["token_type_ids"]),
            "position_ids": scatter(jnp.broadcast_to(pos + spec.position_offset, (B, T))),
            "segment_ids": scatter(jnp.broadcast_to(slot[:, None], (B, T))),
            "slots": start, "labels": labels, "mask": batch["mask"]}


@functools.partial(jax.jit, static_argnames=("n_max", "num_steps", "batch_size"))
def sample_group_indices(round_key: Array, device_ids: Array, counts: Array, *, n_max: int, num_steps: int,
                         batch_size: int) -> tuple[Array, Array]:
    """:func:`~hfl_jax.data.sample_batch_indices` of ``M`` devices at once: ``idx, mask [M, E, B]``
    (what each device's local round draws inside the compiled round, drawn ahead for the plan)."""
    draw = lambda d, c: sample_batch_indices(round_key, d, c, n_max, num_steps, batch_size)
    return jax.vmap(draw)(device_ids, counts)


def plan_group_round(lengths: np.ndarray, counts: np.ndarray, device_ids: np.ndarray, round_key: Array, *,
                     num_steps: int, batch_size: int, row_len: int) -> tuple[dict[str, np.ndarray], int]:
    """The batches of a group round, drawn on the host, and their packing.

    Args:
      lengths: ``[M, n_max]`` real tokens of every row of the group's devices (0 on padding rows).
      counts, device_ids: ``[M]`` rows and global ids of the device slots (as the round gets them).
      round_key: the round's key (the compiled round would draw the same indices from it).

    Returns ``({"idx", "mask", "row", "offset"}`` each ``[M, E, B]``, ``R``). ``R`` is not rounded:
    it is the maximum over all ``M * E`` device-steps, so it varies little from round to round
    (SST-2 study: 5 rows of 64 in 13 of 15 rounds, 6 in 2), and rounding it up to save one
    compilation cost more in every round than the compilation (measured, benchmarks/RESULTS.md).
    """
    n_max = lengths.shape[1]
    idx, mask = sample_group_indices(round_key, jnp.asarray(device_ids, jnp.int32), jnp.asarray(counts, jnp.int32),
                                     n_max=n_max, num_steps=num_steps, batch_size=batch_size)
    idx, mask = np.asarray(idx), np.asarray(mask)
    used = np.take_along_axis(lengths, idx.reshape(len(idx), -1), axis=1).reshape(idx.shape) * mask
    row, offset, rows = plan_packing(used, row_len)
    return {"idx": idx, "mask": mask, "row": row, "offset": offset}, rows


@flax.struct.dataclass
class PackedEval:
    """The evaluation set packed: ``nb`` batches of ``R`` rows of ``L`` tokens holding ``S`` sequences each.

    Attributes:
      input_ids, token_type_ids, position_ids, segment_ids: int32 [nb, R, L] (module doc).
      slots: int32 [nb, S] flat first-token index; labels: int32 [nb, S]; valid: bool [nb, S].
    """

    input_ids: Array | np.ndarray
    token_type_ids: Array | np.ndarray
    position_ids: Array | np.ndarray
    segment_ids: Array | np.ndarray
    slots: Array | np.ndarray
    labels: Array | np.ndarray
    valid: Array | np.ndarray
    hidden_layer: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_examples(self) -> int:
        return int(np.asarray(self.valid).sum())


def pack_eval(tokenized: Mapping[str, np.ndarray], *, row_len: int, num_batches: int,
              position_offset: int = 0) -> PackedEval:
    """The evaluation set (``tokenize_dataset`` output, right-padded ``[N, T]``) packed first-fit
    decreasing into rows of ``row_len``, the rows split into ``num_batches`` batches (sequences stay
    in their row's batch; each batch's metrics are sums, so the order of sequences is immaterial)."""
    lengths = (np.asarray(tokenized["attention_mask"]) > 0).sum(-1)
    row, offset, rows = first_fit_decreasing(lengths, row_len)
    nb = max(1, min(int(num_batches), rows))
    per = -(-rows // nb)                                    # rows per batch
    batch_of, row_in = row // per, row % per
    S = max(1, int(np.bincount(batch_of, minlength=nb).max()))
    out = {k: np.zeros((nb, per, row_len), np.int32)
           for k in ("input_ids", "token_type_ids", "position_ids", "segment_ids")}
    slots, labels, valid = (np.zeros((nb, S), np.int32), np.zeros((nb, S), np.int32), np.zeros((nb, S), bool))
    fill = np.zeros(nb, np.int64)
    for i in range(len(lengths)):
        b, r, o, n = batch_of[i], row_in[i], offset[i], lengths[i]
        s = fill[b]
        fill[b] += 1
        out["input_ids"][b, r, o:o + n] = tokenized["input_ids"][i, :n]
        out["token_type_ids"][b, r, o:o + n] = tokenized["token_type_ids"][i, :n]
        out["position_ids"][b, r, o:o + n] = np.arange(n) + position_offset
        out["segment_ids"][b, r, o:o + n] = s + 1
        slots[b, s], labels[b, s], valid[b, s] = r * row_len + o, tokenized["labels"][i], True
    return PackedEval(slots=slots, labels=labels, valid=valid, **out)
