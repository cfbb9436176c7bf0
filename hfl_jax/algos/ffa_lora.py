"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

Every device keeps each adapter's ``A`` frozen at the shared random initialisation (the same
for all devices, drawn from the run's seed) and trains only ``B`` (and the head); the server
averages ``B``. (The server's weighted means of the identical ``A`` reproduce it up to float
rounding, about one ulp per round.) Since ``delta W = scale A B`` is then linear in the trained factor, the average
of the devices' updates is exactly the update of the averaged adapter. Devices exchange only
``B`` (half the LoRA traffic for square projections). The flat round is
:func:`hfl_jax.algos.fedlora.flat`.
"""
from __future__ import annotations

import functools

import jax
import optax

from hfl_jax.algos.api import FedAlgorithm
from hfl_jax.algos.fedlora import flat


def freeze_a_labels(trainable) -> dict:
    """Labels ``"frozen"`` for every LoRA ``A`` leaf, ``"trained"`` for the rest."""
    lora = jax.tree.map(lambda _: "trained", trainable["lora"])
    lora = lora.replace(weights={t: dict(ab, A="frozen") for t, ab in lora.weights.items()})
    return dict(jax.tree.map(lambda _: "trained", {k: v for k, v in trainable.items() if k != "lora"}), lora=lora)


@functools.lru_cache(maxsize=8)
def freeze_a(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on everything but the LoRA ``A`` factors, whose updates are exactly zero
    (no weight decay either). Cached so a run builds one optimizer (and one compiled round)."""
    return optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, freeze_a_labels)


def build(cfg, num_layers: int) -> FedAlgorithm:
    """FFA-LoRA: A frozen at its shared init, only B (and the head) trained and averaged."""
    return flat("ffa_lora", num_layers, optimizer=freeze_a, factors="B")
