"""Export LoRA adapters (and a classification head) as a Hugging Face PEFT adapter, and load one back.

``export_peft`` writes the directory that ``peft.PeftModel.from_pretrained(base, adapter_dir)``
reads for the transformers model of the family:

* encoders (BERT, RoBERTa, DeBERTa v2/v3) on a ``*ForSequenceClassification`` base: ``task_type="SEQ_CLS"``,
  the LoRA adapters and the classification head;
* decoder LLMs (Llama, Qwen2, Mistral) on a ``*ForCausalLM`` base: ``task_type="CAUSAL_LM"``, the LoRA
  adapters only (a decoder has no trainable head; the LM head stays the base model's, tied or not).

Files:

* ``adapter_config.json``: ``peft_type="LORA"``, ``task_type``, ``r``, ``lora_alpha``,
  ``target_modules`` (the adapted targets only), ``fan_in_fan_out=false``, ``bias="none"``,
  ``layers_to_transform=null`` (every layer is written, also those a fine-tuning depth never
  reached: they carry what they hold, at initialisation ``B = 0``), and for encoders
  ``modules_to_save`` naming the classification head's modules.
* ``adapter_model.safetensors``, float32, keys as PEFT's ``save_pretrained`` writes them::

    base_model.model.{layers}.{i}.{module}.lora_A.weight   # [r, in]  = A[i].T
    base_model.model.{layers}.{i}.{module}.lora_B.weight   # [out, r] = B[i].T
    base_model.model.{head module}.weight / .bias          # encoders: torch Linear kernel.T, bias

  e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` or
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` and
  ``base_model.model.model.layers.0.mlp.down_proj.lora_B.weight``
  (PEFT strips ``modules_to_save.default.`` from the head's keys when saving).

Each family supplies its layout (:class:`PeftLayout`: the task, where layer ``i`` lives, each
target's module inside it, the head): a model class, or its config, may carry a ``peft_layout``
attribute; otherwise :data:`PEFT_LAYOUTS`, keyed by model class (:class:`EncoderModel`,
:class:`DecoderModel`), gives a function ``model -> PeftLayout``.

Encoder targets are one regular expression over the base model's module names (PEFT full-matches a
string), not a list of suffixes, because PEFT matches a list entry ``"output.dense"`` against
``attention.output.dense`` too. Decoder targets are the module names themselves (``"q_proj"``,
..., ``"down_proj"``: each one ends one module only), the list other tools expect.

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
from typing import Any, Callable

import jax
import numpy as np

from hfl_jax.models.decoder import DECODER_MODEL_TYPES, DECODER_TARGETS, DecoderModel
from hfl_jax.models.encoder import EncoderModel
from hfl_jax.models.lora import LoRA

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ROOT = "base_model.model."


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """Where a family's LoRA targets (and trainable head) live in the transformers model PEFT wraps.

    Layer ``i``'s module for target ``t`` is ``{prefix}.{stack}.{i}.{modules[t]}``.
    """

    task_type: str                         # PEFT task: "SEQ_CLS", "CAUSAL_LM"
    prefix: str                            # base model attribute: "bert", "roberta", "deberta", "model"
    stack: str                             # the layer list below it: "encoder.layer", "layers"
    modules: dict[str, str]                # LoRA target -> module path inside layer i, in export order
    head: dict[str, str] = dataclasses.field(default_factory=dict)  # params["head"] key -> torch Linear path
    modules_to_save: tuple[str, ...] = ()  # PEFT module-name suffixes covering ``head``
    names_as_targets: bool = False         # target_modules as module names (each unambiguous), else a regex

    def layer_module(self, i: int, target: str) -> str:
        return f"{self.prefix}.{self.stack}.{i}.{self.modules[target]}"

    def target_modules(self, targets) -> str | list[str]:
        """``adapter_config.json``'s ``target_modules`` selecting exactly ``targets`` in every layer."""
        if self.names_as_targets:
            return [self.modules[t].rsplit(".", 1)[-1] for t in targets]
        alts = "|".join(re.escape(self.modules[t]) for t in targets)
        return rf".*{re.escape(self.stack)}\.\d+\.({alts})"


_LAYER_MODULES = {  # bert, roberta and deberta-v2 share the layer layout below the attention
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_BERT_ATTN = {t: f"attention.self.{t}" for t in ("query", "key", "value")}
_DEBERTA_ATTN = {t: f"attention.self.{t}_proj" for t in ("query", "key", "value")}
ENCODER_LAYOUTS = {   # model_type -> layout on *ForSequenceClassification
    "bert": PeftLayout("SEQ_CLS", "bert", "encoder.layer", {**_BERT_ATTN, **_LAYER_MODULES},
                       {"pooler": "bert.pooler.dense", "classifier": "classifier"}, ("classifier", "pooler")),
    "roberta": PeftLayout("SEQ_CLS", "roberta", "encoder.layer", {**_BERT_ATTN, **_LAYER_MODULES},
                          {"dense": "classifier.dense", "out_proj": "classifier.out_proj"}, ("classifier",)),
    "deberta-v2": PeftLayout("SEQ_CLS", "deberta", "encoder.layer", {**_DEBERTA_ATTN, **_LAYER_MODULES},
                             {"pooler": "pooler.dense", "classifier": "classifier"}, ("classifier", "pooler")),
}
LAYOUTS = ENCODER_LAYOUTS   # the name this table had before decoders
# Llama, Qwen2 and Mistral *ForCausalLM: model.layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
DECODER_LAYOUT = PeftLayout(
    "CAUSAL_LM", "model", "layers",
    {t: f"{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}" for t in DECODER_TARGETS},
    names_as_targets=True)


# Encoder families PEFT cannot express, and why.
NO_PEFT_LAYOUT = {
    "deberta": "PEFT export of DeBERTa v1 (model_type='deberta') is not supported: its attention is one fused "
               "in_proj with heads interleaved as [q_h, k_h, v_h], and hfl_jax's LoRA sits on the split query/key/"
               "value kernels, which a PEFT LoRA on in_proj (a single A and B) cannot express. Use a deberta-v2/v3, "
               "BERT or RoBERTa base model.",
}


def _encoder_layout(model: EncoderModel) -> PeftLayout:
    mt = model.cfg.model_type
    if mt in NO_PEFT_LAYOUT:
        raise NotImplementedError(NO_PEFT_LAYOUT[mt])
    if mt not in ENCODER_LAYOUTS:
        raise NotImplementedError(f"no PEFT layout for model_type {mt!r}; supported: {', '.join(ENCODER_LAYOUTS)}")
    return ENCODER_LAYOUTS[mt]


def _decoder_layout(model: DecoderModel) -> PeftLayout:
    if model.cfg.model_type not in DECODER_MODEL_TYPES:
        raise NotImplementedError(f"no PEFT layout for decoder model_type {model.cfg.model_type!r}")
    return DECODER_LAYOUT


# model class -> its family's layout; a subclass finds its nearest base class's entry
PEFT_LAYOUTS: dict[type, Callable[[Any], PeftLayout]] = {EncoderModel: _encoder_layout, DecoderModel: _decoder_layout}


def peft_layout(model) -> PeftLayout:
    """The family's :class:`PeftLayout`: ``model.peft_layout`` or ``model.cfg.peft_layout`` where the
    family defines one (a layout, or a method returning one), else :data:`PEFT_LAYOUTS`.

    Raises:
      NotImplementedError: DeBERTa v1 (fused ``in_proj``) or a family without a layout.
    """
    own = getattr(model, "peft_layout", None) or getattr(getattr(model, "cfg", None), "peft_layout", None)
    if own is not None:
        return own() if callable(own) else own
    for cls in type(model).__mro__:
        if cls in PEFT_LAYOUTS:
            return PEFT_LAYOUTS[cls](model)
    raise NotImplementedError(f"no PEFT layout for {type(model).__name__}; known: "
                              f"{', '.join(c.__name__ for c in PEFT_LAYOUTS)}")


def _np32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x), np.float32))


def export_peft(model, params: dict, lora: LoRA, out_dir: str | os.PathLike,
                base_model_name_or_path: str, lora_alpha: float | None = None) -> Path:
    """Writes ``lora`` (and an encoder's ``params["head"]``) as a PEFT LoRA adapter directory (module docstring).

    Args:
      model: the :class:`EncoderModel` (bert, roberta, deberta-v2: ``SEQ_CLS``) or
        :class:`DecoderModel` (llama, qwen2, mistral: ``CAUSAL_LM``) the adapters belong to.
      params: model parameters; only an encoder's ``params["head"]`` is written (the frozen base
        never is; a decoder's ``params`` are not read).
      lora: adapters, ``weights[target]["A"]: [L, in, r]``, ``["B"]: [L, r, out]``; the targets
        present are written, each for all ``L`` layers (layers below a fine-tuning depth carry
        whatever they hold).
      out_dir: directory to create or overwrite files in.
      base_model_name_or_path: recorded in ``adapter_config.json`` for users to load the base.
      lora_alpha: alpha to record; default ``lora.scale * r``. Another value keeps the
        function unchanged by rescaling ``B`` by ``lora.scale / (lora_alpha / r)``.

    Returns:
      ``Path(out_dir)``.

    Raises:
      NotImplementedError: DeBERTa v1 (fused ``in_proj``) or a family without a layout.
      ValueError: a target the family cannot place, or adapters for another number of layers.
    """
    from safetensors.numpy import save_file

    layout = peft_layout(model)
    unknown = sorted(set(lora.weights) - set(layout.modules))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} have no PEFT module; this family's: {list(layout.modules)}")
    r = lora.rank
    alpha = float(lora.scale * r) if lora_alpha is None else float(lora_alpha)
    b_factor = 1.0 if lora_alpha is None else lora.scale / (alpha / r)
    L = model.num_layers

    tensors: dict[str, np.ndarray] = {}
    targets = [t for t in layout.modules if t in lora.weights]
    for t in targets:
        A, B = _np32(lora.weights[t]["A"]), _np32(lora.weights[t]["B"])
        if A.shape[0] != L or B.shape[0] != L:
            raise ValueError(f"LoRA target {t!r} has {A.shape[0]} layers, the model has {L}")
        if b_factor != 1.0:
            B = (B * np.float32(b_factor)).astype(np.float32)
        for i in range(L):
            key = _ROOT + layout.layer_module(i, t)
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(A[i].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(B[i].T)
    for name, module in layout.head.items():
        dense = params["head"][name]
        tensors[f"{_ROOT}{module}.weight"] = np.ascontiguousarray(_np32(dense["kernel"]).T)
        tensors[f"{_ROOT}{module}.bias"] = _np32(dense["bias"])

    config = {
        "peft_type": "LORA",
        "task_type": layout.task_type,
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": int(r),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": layout.target_modules(targets),
        "modules_to_save": list(layout.modules_to_save) or None,
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


def _check_config(config: dict[str, Any], where: Path, layout: PeftLayout) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    task = config.get("task_type")
    if task is not None and task != layout.task_type:
        raise ValueError(f"{where}: task_type is {task!r}; this model's adapters are {layout.task_type!r}")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append("bias")
    if unsupported:
        raise NotImplementedError(f"{where}: PEFT options {unsupported} have no hfl_jax LoRA equivalent")


def load_peft(model, params: dict, adapter_dir: str | os.PathLike) -> tuple[dict, LoRA]:
    """Reads a PEFT LoRA adapter directory back into hfl_jax (the inverse of :func:`export_peft`).

    Args:
      model: the base :class:`EncoderModel` or :class:`DecoderModel`.
      params: base parameters; an encoder's head parts found in the adapter replace
        ``params["head"]``'s (a decoder's are returned as they are).
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
      ``(params, lora)``: a new parameter tree (same leaves, adapter head swapped in) and
      :class:`LoRA` (float32, targets in the family's order) with ``scale = lora_alpha / r``
      (``/ sqrt(r)`` under ``use_rslora``). Layers the adapter does not touch get zero ``A`` and ``B``.

    Raises:
      NotImplementedError: DeBERTa v1, DoRA, per-module ranks/alphas, LoRA biases.
      ValueError: not a LoRA adapter, another task type, a module hfl_jax cannot adapt, or shapes
        that do not fit.
    """
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from hfl_jax.models.lora import target_dims

    layout = peft_layout(model)
    where = Path(adapter_dir)
    config = json.loads((where / CONFIG_NAME).read_text())
    _check_config(config, where, layout)
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
    state = load_file(str(where / WEIGHTS_NAME))
    # Keys may carry PEFT's adapter name ("...lora_A.default.weight") when saved by other tools.
    state = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", k): v for k, v in state.items()}

    by_module = {m: t for t, m in layout.modules.items()}
    stack = f"{_ROOT}{layout.prefix}.{layout.stack}"
    pattern = re.compile(rf"{re.escape(stack)}\.(\d+)\.(.+)\.lora_([AB])\.weight")
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
        raise ValueError(f"{where}: no LoRA tensors under {stack}.*")
    heads = {f"{_ROOT}{m}.{p}" for m in layout.head.values() for p in ("weight", "bias")}
    others = sorted(k for k in state if pattern.fullmatch(k) is None and k not in heads)
    if others:   # e.g. LoRA on the embeddings or lm_head, or a decoder's modules_to_save: not silently dropped
        raise ValueError(f"{where}: tensors hfl_jax has no place for: {others[:5]}{' ...' if len(others) > 5 else ''}")

    weights = {}
    for t in [t for t in layout.modules if t in found]:
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

    if not layout.head:
        return dict(params), LoRA(weights=weights, scale=float(scale))
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
