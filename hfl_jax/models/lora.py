"""Pure-functional LoRA: adapters as their own pytree, merging, and the trained layer set (depth masks).

For a frozen projection ``y = x W`` (``W: [in, out]``) LoRA adds
``scale * (x A) B`` with ``A: [in, r]``, ``B: [r, out]`` and ``scale = alpha / r``
(Hu et al., 2021). ``B`` starts at zero, so an untrained adapter leaves the
model unchanged. Layout, for the stacked layers of an ``L``-layer encoder::

    LoRA.weights = {target: {"A": [L, in, r], "B": [L, r, out]}}

Conversion to/from PEFT: ``A = lora_A.weight.T`` and ``B = lora_B.weight.T``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfl_jax.models.config import EncoderConfig

Array = jax.Array

TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")
# Where each target's frozen kernel lives inside one layer's parameters.
TARGET_PATHS = {
    "query": ("attention", "query"),
    "key": ("attention", "key"),
    "value": ("attention", "value"),
    "attention_output": ("attention_output",),
    "intermediate": ("intermediate",),
    "output": ("output",),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, their rank and alpha (scale = alpha / rank)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one projection")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@flax.struct.dataclass
class LoRA:
    """LoRA adapters for every layer. ``weights[target]["A"]: [L, in, r]``, ``["B"]: [L, r, out]``.

    ``scale`` is static (part of the tree structure, not a leaf).
    """

    weights: dict[str, dict[str, Array]]
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))["A"].shape[-1]


def target_dims(cfg, target: str) -> tuple[int, int]:
    """(in, out) features of a target projection. A model config that owns its targets (a decoder's
    ``q_proj`` ... ``down_proj``) answers through its ``lora_target_dims(target)``; the encoders'
    targets are read off ``hidden_size``/``intermediate_size``."""
    if hasattr(cfg, "lora_target_dims"):
        return tuple(cfg.lora_target_dims(target))
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"intermediate": (H, I), "output": (I, H)}.get(target, (H, H))


def init_lora(rng: Array, cfg, lora_cfg: LoRAConfig, dtype=jnp.float32) -> LoRA:
    """Fresh adapters: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's kaiming-uniform(a=sqrt 5)), ``B = 0``."""
    weights = {}
    for i, t in enumerate(lora_cfg.targets):
        d_in, d_out = target_dims(cfg, t)
        bound = 1.0 / np.sqrt(d_in)
        A = jax.random.uniform(jax.random.fold_in(rng, i), (cfg.num_layers, d_in, lora_cfg.rank), dtype,
                               -bound, bound)
        weights[t] = {"A": A, "B": jnp.zeros((cfg.num_layers, lora_cfg.rank, d_out), dtype)}
    return LoRA(weights=weights, scale=lora_cfg.scale)


def _get(tree: Mapping, path: Sequence[str]):
    for p in path:
        tree = tree[p]
    return tree


def merge_lora(params: dict, lora: LoRA, paths: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Plain weights whose outputs equal the adapted model: ``W + scale * A B`` per layer.

    ``paths``: target -> path of its kernel's parent inside one layer's parameters (default the
    encoders' :data:`TARGET_PATHS`; a decoder passes its own)."""
    paths = TARGET_PATHS if paths is None else paths
    layers = jax.tree.map(lambda x: x, params["layers"])  # new containers, shared leaves
    for t, ab in lora.weights.items():
        node = _get(layers, paths[t])
        node["kernel"] = node["kernel"] + lora.scale * jnp.einsum("lir,lro->lio", ab["A"], ab["B"])
    return {**params, "layers": layers}


LAYER_POLICIES = ("top", "bottom", "spread")


def check_layer_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`LAYER_POLICIES`, else ValueError."""
    if policy not in LAYER_POLICIES:
        raise ValueError(f"unknown layer policy {policy!r}; one of {', '.join(LAYER_POLICIES)}")
    return policy


def layer_mask(num_layers: int, depth, policy: str = "top"):
    """``[L]`` bool, True for the ``depth`` layers that are fine-tuned (``algorithm.layer_policy``):

    * ``top``: layers ``>= L - d`` (HierFedLoRA's depth);
    * ``bottom``: layers ``< d``;
    * ``spread``: ``d`` layers evenly spaced from the top, ``L - 1 - floor(k L / d)`` for
      ``k = 0 .. d - 1`` (``d = L``: every layer; ``d = 1``: the top one).

    ``depth`` an int (checked, numpy result), or a traced int32 array (not checked; a ``jnp``
    result of shape ``depth.shape + (L,)``, so ``depths[:, None]`` gives ``[K, L]``).
    """
    check_layer_policy(policy)
    if isinstance(depth, jax.Array):
        xp = jnp
    else:
        if not 0 <= depth <= num_layers:
            raise ValueError(f"depth must be in [0, {num_layers}], got {depth}")
        xp = np
    layers = xp.arange(num_layers)
    if policy == "top":
        return layers >= num_layers - depth
    if policy == "bottom":
        return layers < depth
    # spread: layer L - 1 - j is trained iff j = floor(k L / d) for some k in [0, d), i.e. iff the
    # interval [j d / L, (j + 1) d / L) holds an integer: ceil(j d / L) * L < (j + 1) d
    j = num_layers - 1 - layers
    return (j * depth + num_layers - 1) // num_layers * num_layers < (j + 1) * depth


def lowest_trained_layer(num_layers: int, depth, policy: str = "top"):
    """The lowest layer :func:`layer_mask` trains, ``L`` at depth 0: the backward pass runs from the
    top down to it. ``depth`` an int (checked) or a traced int32 scalar (then a traced result)."""
    check_layer_policy(policy)
    traced = isinstance(depth, jax.Array)
    if not traced and not 0 <= depth <= num_layers:
        raise ValueError(f"depth must be in [0, {num_layers}], got {depth}")
    if policy == "top":
        return num_layers - depth
    if policy == "bottom":
        lowest = 0
    else:   # spread: its last index, k = d - 1
        lowest = num_layers - 1 - (depth - 1) * num_layers // (jnp.maximum(depth, 1) if traced else max(depth, 1))
    return jnp.where(depth > 0, lowest, num_layers) if traced else (lowest if depth > 0 else num_layers)


def mask_layers(tree: Any, mask: Array) -> Any:
    """Zeroes every LoRA leaf ``[L, ...]`` where ``mask[L]`` is False."""
    return jax.tree.map(lambda x: x * mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), tree)


def depth_masked(inner: optax.GradientTransformation, num_layers: int, depth: int,
                 policy: str = "top") -> optax.GradientTransformation:
    """Wraps an optimizer for a ``{"lora": LoRA, "head": ...}`` trainable tree so that the LoRA
    updates of every layer outside :func:`layer_mask` (``depth``, ``policy``) are exactly zero (the
    head is always trained).

    Together with the ``stop_gradient`` cut in the forward pass this makes the untrained
    layers' adapters bit-identical across steps, whatever the optimizer's state holds (those
    between trained layers get a gradient, which the mask discards).
    ``depth`` may be a traced int32 scalar (one program for every depth; not checked).
    """
    mask = jnp.asarray(layer_mask(num_layers, depth, policy))

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        return {**updates, "lora": mask_layers(updates["lora"], mask)}, state

    return optax.GradientTransformation(inner.init, update)


def resolve_depth(num_layers: int, depth, start_layer: int, hidden0, policy: str = "top") -> tuple:
    """``(depth, start_layer)`` of a forward pass, checked: ``depth`` (``None``: every layer; an int;
    or a traced int32 scalar, not checked) and ``start_layer`` with its cached ``hidden0`` (given
    iff ``start_layer > 0``, which must not pass the lowest layer ``policy`` trains at ``depth``,
    :func:`lowest_trained_layer`). Shared by the encoder and decoder families."""
    traced = isinstance(depth, jax.Array)
    depth = num_layers if depth is None else (depth if traced else int(depth))
    start_layer = int(start_layer)
    if not traced and not 0 <= depth <= num_layers:
        raise ValueError(f"depth must be in [0, {num_layers}], got {depth}")
    lowest = num_layers - 1 if traced else lowest_trained_layer(num_layers, depth, policy)
    if (hidden0 is None) != (start_layer == 0) or not 0 <= start_layer <= lowest:
        raise ValueError(f"start_layer={start_layer} needs hidden0 (iff > 0) and must be in [0, the lowest "
                         f"trained layer = {num_layers if traced else lowest}] (layer policy {policy!r})")
    return depth, start_layer


def depth_cut(run_layers, h, num_layers: int, depth, start_layer: int, remat: str, policy: str = "top"):
    """Layers ``[start_layer, L)`` with gradients only down to the lowest layer ``policy`` trains at
    ``depth`` (:func:`lowest_trained_layer`; ``top``: the top ``depth``):
    ``run_layers(h, start, stop, remat="none", cut=None) -> h`` runs a slice of the stacked layers.
    A static depth runs the layers below under ``stop_gradient`` (no backward pass through
    them); a traced one runs every layer in one scan and cuts the gradient at the lowest trained
    layer's input (one program for every depth). Untrained layers above it (``bottom``, ``spread``)
    are differentiated; :func:`depth_masked` discards their adapters' updates."""
    lowest = lowest_trained_layer(num_layers, depth, policy)
    if isinstance(depth, jax.Array):
        h = run_layers(h, start_layer, num_layers, remat=remat, cut=lowest)
        return jnp.where(depth == 0, jax.lax.stop_gradient(h), h)
    if lowest > start_layer:
        h = jax.lax.stop_gradient(run_layers(h, start_layer, lowest))
    if depth > 0:
        h = run_layers(h, lowest, num_layers, remat=remat)
    return h
