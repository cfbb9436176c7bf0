"""Helpers that turn a flat Hugging Face (PyTorch-layout) state dict into hfl_jax parameters.

Each family module writes one ``convert(tensors, cfg)`` that returns the nested
parameter tree; these helpers do the per-tensor work and raise
:class:`CheckpointError` naming the missing tensor.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be imported: missing tensor, wrong shape, unsupported format."""


class Tensors:
    """Read-only view of a checkpoint's tensors with the model prefix stripped.

    ``prefix`` is what precedes ``embeddings.word_embeddings.weight`` (``""`` for a
    bare ``BertModel``, ``"bert."`` or ``"roberta."`` for a ``*ForSequenceClassification``).
    """

    def __init__(self, state: Mapping[str, np.ndarray], source: str = "checkpoint"):
        self.state = state
        self.source = source
        anchors = [k for k in state if k.endswith("embeddings.word_embeddings.weight")]
        self.prefix = anchors[0][: -len("embeddings.word_embeddings.weight")] if anchors else ""
        self.used: set[str] = set()

    def has(self, name: str, base: bool = True) -> bool:
        return (self.prefix + name if base else name) in self.state

    def get(self, name: str, *, base: bool = True) -> np.ndarray:
        """Tensor ``name`` (under the base-model prefix when ``base``)."""
        key = self.prefix + name if base else name
        if key not in self.state:
            raise CheckpointError(f"missing tensor {key!r} in {self.source}")
        self.used.add(key)
        return np.asarray(self.state[key], dtype=np.float32)

    def linear(self, name: str, *, base: bool = True, bias: bool = True) -> dict:
        """PyTorch ``nn.Linear`` (weight ``[out, in]``) -> ``{"kernel": [in, out], "bias": [out]}``."""
        out = {"kernel": self.get(f"{name}.weight", base=base).T}
        if bias:
            out["bias"] = self.get(f"{name}.bias", base=base)
        return out

    def layer_norm(self, name: str, *, base: bool = True) -> dict:
        return {"scale": self.get(f"{name}.weight", base=base), "bias": self.get(f"{name}.bias", base=base)}


def stack_layers(num_layers: int, layer_fn: Callable[[int], dict]) -> dict:
    """Stacks per-layer parameter trees on a new leading axis ``[L, ...]``."""
    import jax

    layers = [layer_fn(i) for i in range(num_layers)]
    first = jax.tree_util.tree_flatten_with_path(layers[0])[0]
    for i, layer in enumerate(layers[1:], start=1):
        for (path, a), b in zip(first, jax.tree.leaves(layer)):
            if np.shape(a) != np.shape(b):
                raise CheckpointError(
                    f"shape mismatch for layer {i} parameter {jax.tree_util.keystr(path)}: {np.shape(b)}, "
                    f"layer 0 has {np.shape(a)}")
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)
