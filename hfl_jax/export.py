"""Export LoRA adapters and the classification head as a Hugging Face PEFT adapter, and load one back.

``export_peft`` writes the directory that ``peft.PeftModel.from_pretrained(base, adapter_dir)``
reads for a ``*ForSequenceClassification`` base model:

* ``adapter_config.json``: ``peft_type="LORA"``, ``task_type="SEQ_CLS"``, ``r``,
  ``lora_alpha``, ``target_modules`` as one regular expression over the
  base model's module names (PEFT full-matches a string), and
  ``modules_to_save`` naming the classification head's modules.
* ``adapter_model.safetensors``, keys as PEFT's ``save_pretrained`` writes them::

    base_model.model.{prefix}.encoder.layer.{i}.{module}.lora_A.weight   # [r, in]  = A[i].T
    base_model.model.{prefix}.encoder.layer.{i}.{module}.lora_B.weight   # [out, r] = B[i].T
    base_model.model.{head module}.weight / .bias                        # torch Linear: kernel.T, bias

  (PEFT strips ``modules_to_save.default.`` from the head's keys when saving.)

A regular expression, not a list of suffixes, because PEFT matches a list
entry ``"output.dense"`` against ``attention.output.dense`` too.

DeBERTa v1 is refused: its attention uses one fused ``in_proj`` whose rows
interleave heads as ``[q_h, k_h, v_h]``; hfl_jax splits it and adapts query,
key and value separately, which a PEFT LoRA on ``in_proj`` (one ``A``, one
``B`` for all three) cannot express.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hfl_jax.models.encoder import EncoderModel
from hfl_jax.models.lora import TARGETS, LoRA

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ROOT = "base_model.model."

_LAYER_MODULES = {  # bert, roberta and deberta-v2 share the layer layout below the attention
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a family's LoRA targets and head live in its transformers ``*ForSequenceClassification``."""

    prefix: str                      # base encoder attribute: "bert", "roberta", "deberta"
    modules: dict[str, str]          # LoRA target -> module path inside encoder.layer.{i}
    head: dict[str, str]             # params["head"] key -> torch Linear module path
    modules_to_save: tuple[str, ...]  # PEFT module-name suffixes covering ``head``


_BERT_ATTN = {t: f"attention.self.{t}" for t in ("query", "key", "value")}
_DEBERTA_ATTN = {t: f"attention.self.{t}_proj" for t in ("query", "key", "value")}
LAYOUTS = {
    "bert": _Layout("bert", {**_BERT_ATTN, **_LAYER_MODULES},
                    {"pooler": "bert.pooler.dense", "classifier": "classifier"}, ("classifier", "pooler")),
    "roberta": _Layout("roberta", {**_BERT_ATTN, **_LAYER_MODULES},
                       {"dense": "classifier.dense", "out_proj": "classifier.out_proj"}, ("classifier",)),
    "deberta-v2": _Layout("deberta", {**_DEBERTA_ATTN, **_LAYER_MODULES},
                          {"pooler": "pooler.dense", "classifier": "classifier"}, ("classifier", "pooler")),
}


def _layout(model: EncoderModel) -> _Layout:
    mt = model.cfg.model_type
    if mt == "deberta":
        raise NotImplementedError(
            "PEFT export of DeBERTa v1 (model_type='deberta') is not supported: its attention is one fused "
            "in_proj with heads interleaved as [q_h, k_h, v_h], and hfl_jax's LoRA sits on the split query/key/"
            "value kernels, which a PEFT LoRA on in_proj (a single A and B) cannot express. Use a deberta-v2/v3, "
            "BERT or RoBERTa base model.")
    if mt not in LAYOUTS:
        raise NotImplementedError(f"no PEFT layout for model_type {mt!r}; supported: {', '.join(LAYOUTS)}")
    return LAYOUTS[mt]


def _target_regex(layout: _Layout, targets) -> str:
    alts = "|".join(re.escape(layout.modules[t]) for t in targets)
    return rf".*encoder\.layer\.\d+\.({alts})"


def _np32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x), np.float32))


def export_peft(model: EncoderModel, params: dict, lora: LoRA, out_dir: str | os.PathLike,
                base_model_name_or_path: str, lora_alpha: float | None = None) -> Path:
    """Writes ``lora`` and ``params["head"]`` as a PEFT LoRA adapter directory (see module docstring).

    Args:
      model: the :class:`EncoderModel` the adapters belong to (bert, roberta, deberta-v2).
      params: model parameters; only ``params["head"]`` is written (the frozen base is not).
      lora: adapters, ``weights[target]["A"]: [L, in, r]``, ``["B"]: [L, r, out]``; all ``L``
        layers are written (layers below a fine-tuning depth carry whatever they hold).
      out_dir: directory to create or overwrite files in.
      base_model_name_or_path: recorded in ``adapter_config.json`` for users to load the base.
      lora_alpha: alpha to record; default ``lora.scale * r``. Another value keeps the
        function unchanged by rescaling ``B`` by ``lora.scale / (lora_alpha / r)``.

    Returns:
      ``Path(out_dir)``.

    Raises:
      NotImplementedError: DeBERTa v1 (fused ``in_proj``) or an unknown family.
    """
    from safetensors.numpy import save_file

    layout = _layout(model)
    r = lora.rank
    alpha = float(lora.scale * r) if lora_alpha is None else float(lora_alpha)
    b_factor = 1.0 if lora_alpha is None else lora.scale / (alpha / r)
    L = model.num_layers

    tensors: dict[str, np.ndarray] = {}
    targets = [t for t in TARGETS if t in lora.weights]
    for t in targets:
        A, B = _np32(lora.weights[t]["A"]), _np32(lora.weights[t]["B"])
        if A.shape[0] != L or B.shape[0] != L:
            raise ValueError(f"LoRA target {t!r} has {A.shape[0]} layers, the model has {L}")
        if b_factor != 1.0:
            B = (B * np.float32(b_factor)).astype(np.float32)
        for i in range(L):
            key = f"{_ROOT}{layout.prefix}.encoder.layer.{i}.{layout.modules[t]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(A[i].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(B[i].T)
    for name, module in layout.head.items():
        dense = params["head"][name]
        tensors[f"{_ROOT}{module}.weight"] = np.ascontiguousarray(_np32(dense["kernel"]).T)
        tensors[f"{_ROOT}{module}.bias"] = _np32(dense["bias"])

    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": int(r),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": _target_regex(layout, targets),
        "modules_to_save": list(layout.modules_to_save),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _check_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append("bias")
    if unsupported:
        raise NotImplementedError(f"{where}: PEFT options {unsupported} have no hfl_jax LoRA equivalent")


def load_peft(model: EncoderModel, params: dict, adapter_dir: str | os.PathLike) -> tuple[dict, LoRA]:
    """Reads a PEFT LoRA adapter directory back into hfl_jax (the inverse of :func:`export_peft`).

    Args:
      model: the base :class:`EncoderModel`.
      params: base parameters; head parts found in the adapter replace ``params["head"]``'s.
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
      ``(params, lora)``: a new parameter tree (same leaves, adapter head swapped in) and
      :class:`LoRA` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` under ``use_rslora``).
      Layers the adapter does not touch get zero ``A`` and ``B``.

    Raises:
      NotImplementedError: DeBERTa v1, DoRA, per-module ranks/alphas, LoRA biases.
      ValueError: not a LoRA adapter, a module hfl_jax cannot adapt, or shapes that do not fit.
    """
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from hfl_jax.models.lora import target_dims

    layout = _layout(model)
    where = Path(adapter_dir)
    config = json.loads((where / CONFIG_NAME).read_text())
    _check_config(config, where)
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
    state = load_file(str(where / WEIGHTS_NAME))
    # Keys may carry PEFT's adapter name ("...lora_A.default.weight") when saved by other tools.
    state = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", k): v for k, v in state.items()}

    by_module = {m: t for t, m in layout.modules.items()}
    pattern = re.compile(rf"{re.escape(_ROOT + layout.prefix)}\.encoder\.layer\.(\d+)\.(.+)\.lora_([AB])\.weight")
    L = model.num_layers
    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key, value in state.items():
        m = pattern.fullmatch(key)
        if m is None:
            continue
        i, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in by_module:
            raise ValueError(f"{where}: LoRA on {module!r} has no hfl_jax target; known: {sorted(by_module)}")
        if i >= L:
            raise ValueError(f"{where}: {key} is beyond the model's {L} layers")
        found.setdefault(by_module[module], {"A": {}, "B": {}})[ab][i] = np.asarray(value, np.float32).T
    if not found:
        raise ValueError(f"{where}: no LoRA tensors under {_ROOT}{layout.prefix}.encoder.layer.*")

    weights = {}
    for t in [t for t in TARGETS if t in found]:
        d_in, d_out = target_dims(model.cfg, t)
        shapes = {"A": (d_in, r), "B": (r, d_out)}
        stacked = {}
        for ab, shape in shapes.items():
            layers = np.zeros((L,) + shape, np.float32)
            for i, w in found[t][ab].items():
                if w.shape != shape:
                    raise ValueError(f"{where}: layer {i} {t} lora_{ab} has shape {w.shape[::-1]}, "
                                     f"expected {shape[::-1]}")
                layers[i] = w
            stacked[ab] = jnp.asarray(layers)
        weights[t] = stacked

    head = dict(params["head"])
    for name, module in layout.head.items():
        wkey, bkey = f"{_ROOT}{module}.weight", f"{_ROOT}{module}.bias"
        if wkey not in state:
            continue
        kernel = np.asarray(state[wkey], np.float32).T
        if kernel.shape != np.shape(head[name]["kernel"]):
            raise ValueError(f"{where}: head {module} has shape {kernel.shape[::-1]}, the model expects "
                             f"{np.shape(head[name]['kernel'])[::-1]}")
        head[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(np.asarray(state[bkey], np.float32))}
    return {**params, "head": head}, LoRA(weights=weights, scale=float(scale))
