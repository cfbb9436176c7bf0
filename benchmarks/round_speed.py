"""Speed of one group's local round: vmapped (one compiled call) vs a Python loop vs PyTorch + PEFT.

Times E local steps of M simulated devices (per-device batch B, sequence length
T, fine-tuning depth d, LoRA rank r on query+value; on q/k/v/o/gate/up/down for the
decoder shapes) after compilation, up to four ways:

  vmap   ``hfl_jax.fed.engine.make_group_round``: all M devices vmapped in one
         jitted call that also does FedAvg (the frozen base is shared).
  loop   a Python loop calling ``jax.jit(make_local_train(...))`` once per
         device, then a jitted FedAvg over the stacked results.
  torch  transformers ``*ForSequenceClassification`` + PEFT LoRA, looping over
         devices (fresh Adam per device, the same batches), then FedAvg.
  torch-vmap  the strongest plain-PyTorch way: ``torch.func.vmap(grad)`` of a
         ``functional_call`` of the same PEFT model over the devices' stacked
         adapters (frozen base unbatched), a hand-written AdamW, under
         ``torch.compile`` (``--torch-vmap compile``, default) or eager, bf16
         autocast with ``--compute-dtype bfloat16``; equal to the torch loop after a
         round in float32 (``tests/test_torch_vmap_peer.py``).

Models: encoders (``tiny``, the packaged ``minilm-l6``, ``roberta-base-shape``) with a
classification head and cross-entropy on the labels; decoder LLMs (``smollm2-135m-shape``,
``qwen2.5-0.5b-shape``, ``llama-3.2-1b-shape``, ``mistral-7b-shape``: ``DECODER_SHAPES`` with
``--layers`` layers, random weights from transformers' own initialisation copied into hfl_jax by
``convert_decoder``) with the causal-LM loss on response tokens (random rows, the loss on the
tokens after a random prompt length). For decoders the PyTorch side is ``*ForCausalLM`` with the
same weights; under bf16 both torch peers use autocast and compute the LM head in float32, as
hfl_jax does. ``--check`` compares hfl_jax and PyTorch on the same weights, adapters and batches
(decoders) instead of timing.

Reports examples/s, tokens/s, achieved FLOP/s from the analytic count
(``hfl_jax.fed.timemodel.step_flops`` x E x M), the machine's matmul peak
measured in the same run, XLA's memory analysis of the compiled call, the
process RSS high-water mark and compile time. ``--sweep`` adds scaling tables
over devices M, depth d and batch B for the vmapped round.

Example::

    python benchmarks/round_speed.py --model minilm-l6 --devices 8 --batch 2 --seq-len 64
    python benchmarks/round_speed.py --model minilm-l6 --sweep --methods vmap
    python benchmarks/round_speed.py --model smollm2-135m-shape --layers 30 -M 8 -B 2 --methods vmap,torch,torch-vmap
    python benchmarks/round_speed.py --model smollm2-135m-shape --layers 2 -M 2 -T 16 --check
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from hfl_jax.data import make_device_data, sample_batch_indices  # noqa: E402
from hfl_jax.fed.aggregate import weighted_mean  # noqa: E402
from hfl_jax.fed.device_axis import DeviceAxis  # noqa: E402
from hfl_jax.fed.engine import make_group_round  # noqa: E402
from hfl_jax.fed.frozen_cache import attach_hidden  # noqa: E402
from hfl_jax.fed.local import base_of, make_local_train  # noqa: E402
from hfl_jax.fed.xla import compiler_options, jit  # noqa: E402
from hfl_jax.fed.timemodel import family_cost, layer_forward_flops, step_flops  # noqa: E402
from hfl_jax.models.layers import prepare_base  # noqa: E402
from hfl_jax.models import (DECODER_SHAPES, DECODER_TARGETS, DecoderConfig, DecoderModel, EncoderConfig,  # noqa: E402
                            EncoderModel, LoRAConfig, init_lora)

TARGETS = ("query", "value")   # the encoders' LoRA targets (decoders: DECODER_TARGETS, all seven projections)
# decoder shapes: a hub checkpoint's config.json (hfl_jax.models.DECODER_SHAPES) with --layers layers
DECODER_MODELS = {f"{k}-shape": k for k in DECODER_SHAPES}
MODELS = ("tiny", "minilm-l6", "roberta-base-shape", *DECODER_MODELS)
DECODER_LAYERS = 4   # --layers default: a few layers (the LM head's cost weighs more than at full depth)
METHODS = ("vmap", "vmap-plain", "loop", "torch", "torch-vmap")
MiB = 2.0 ** 20

# Columns of the main table (tests/test_benchmark_smoke.py checks these names).
COLUMNS = ("method", "M", "B", "T", "E", "d", "compile s", "best s", "median s", "examples/s", "tokens/s",
           "GFLOP/s", "% peak", "XLA MiB", "RSS MiB", "speedup of vmap")


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    name: str
    model: EncoderModel | DecoderModel
    params: dict
    hf_dir: Path | None  # packaged checkpoint (for the torch baseline), None for random models
    hf_config: dict | None = None  # decoders: the config.json dict the torch peers build their model from
    hf_state: dict | None = None   # decoders: the torch state dict hfl_jax's params were converted from

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.model, DecoderModel)

    @property
    def targets(self) -> tuple[str, ...]:
        """The default LoRA targets: query+value for encoders, all seven projections for decoders."""
        return DECODER_TARGETS if self.is_decoder else TARGETS


def build_decoder(name: str, layers: int = DECODER_LAYERS, compute_dtype=None, seed: int = 0,
                  unroll: int | bool = 1) -> Setup:
    """A decoder of ``DECODER_SHAPES[name]``'s widths and vocabulary with ``layers`` layers. The weights
    are transformers' own random initialisation (``torch.manual_seed(seed)``), converted by hfl_jax's
    checkpoint converter (``convert_decoder``, the direction tests/test_decoder.py checks), so the
    torch peers load the very same weights; hfl_jax's own random init when torch is missing."""
    hf = dict(DECODER_SHAPES[name], num_hidden_layers=int(layers))
    model = DecoderModel(DecoderConfig.from_hf(hf), compute_dtype=compute_dtype, unroll=unroll)
    try:
        import torch
        import transformers
    except ImportError:
        return Setup(f"{name}-shape", model, jax.jit(model.init)(jax.random.PRNGKey(seed)), None, hf, None)
    from hfl_jax.models.decoder import convert_decoder

    kw = {k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype", "model_type")}
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(hf["model_type"], **kw))
    state = {k: v.detach().float() for k, v in ref.state_dict().items()}
    del ref
    params = convert_decoder({k: v.numpy() for k, v in state.items()}, model, source=f"random {name}")
    return Setup(f"{name}-shape", model, params, None, hf, state)


def build_model(name: str, compute_dtype=None, seed: int = 0, unroll: int | bool = 1,
                layers: int | None = None) -> Setup:
    """The model under test: packaged MiniLM, a random RoBERTa-base shape, a tiny random BERT, or a
    random decoder of a hub checkpoint's shape with ``layers`` layers (:func:`build_decoder`)."""
    if name in DECODER_MODELS:
        return build_decoder(DECODER_MODELS[name], layers or DECODER_LAYERS, compute_dtype, seed, unroll)
    if name == "minilm-l6":
        from hfl_jax.models import load_pretrained, resolve_model_dir

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the packaged checkpoint has no classifier: fresh head
            model, params = load_pretrained("minilm-l6", num_labels=2, seed=seed, compute_dtype=compute_dtype)
        return Setup(name, dataclasses.replace(model, unroll=unroll), params, resolve_model_dir("minilm-l6"))
    if name == "roberta-base-shape":
        cfg = EncoderConfig(model_type="roberta", vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                            layer_norm_eps=1e-5, pad_token_id=1, num_labels=2)
    elif name == "tiny":
        cfg = EncoderConfig(model_type="bert", vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64, max_position_embeddings=128, num_labels=2)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model = EncoderModel(cfg, compute_dtype=compute_dtype, unroll=unroll)
    return Setup(name, model, model.init(jax.random.PRNGKey(seed)), None)


def synthetic_data(cfg: EncoderConfig | DecoderConfig, M: int, n_per_device: int, T: int, seed: int = 0):
    """Random full-length sequences: M devices of ``n_per_device`` rows each (host numpy). Encoders: a
    class label per row. Decoders: per-token labels ``[n, T]``, the row's own tokens after a random
    prompt length in ``[T/4, 3T/4)``, ``-100`` on the prompt (the causal-LM loss on response tokens)."""
    rng = np.random.default_rng(seed)
    n = M * n_per_device
    ids = rng.integers(5, cfg.vocab_size, (n, T)).astype(np.int32)
    if isinstance(cfg, DecoderConfig):
        prompt = rng.integers(T // 4, max(T // 4 + 1, 3 * T // 4), n)
        labels = np.where(np.arange(T)[None] >= prompt[:, None], ids, -100).astype(np.int32)
    else:
        labels = rng.integers(0, cfg.num_labels, n).astype(np.int32)
    tok = {"input_ids": ids,
           "attention_mask": np.ones((n, T), np.int32),
           "token_type_ids": np.zeros((n, T), np.int32),
           "labels": labels}
    parts = [np.arange(m * n_per_device, (m + 1) * n_per_device) for m in range(M)]
    return make_device_data(tok, parts)


@dataclasses.dataclass(frozen=True)
class Work:
    M: int
    B: int
    T: int
    E: int
    d: int
    rank: int
    alpha: float
    lr: float
    cached: int = 0  # bottom layers whose outputs come from the frozen-layer cache (0: none)
    targets: tuple[str, ...] = TARGETS  # LoRA targets (decoders: DECODER_TARGETS)

    @property
    def examples(self) -> int:
        return self.M * self.E * self.B

    def flops(self, cfg) -> float:
        """Counted FLOPs of the round: ``step_flops x E x M``, less the cached layers' forward (the
        family's own cost model for decoders: GQA, SwiGLU, the LM head)."""
        per_step = step_flops(cfg, self.B, self.T, self.d, self.rank, self.targets)
        layer_fwd = family_cost(cfg).layer_forward_flops if family_cost(cfg) is not None else layer_forward_flops
        per_step -= self.cached * layer_fwd(cfg, self.B, self.T, self.rank, self.targets)
        return per_step * self.E * self.M


@dataclasses.dataclass
class Result:
    method: str
    work: Work
    compile_s: float
    times: list
    flops: float
    xla_bytes: float | None  # XLA peak estimate of the compiled call (arguments + outputs + temps - aliased)
    rss_bytes: float         # process RSS high-water mark after this method ran
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def rss_peak_bytes() -> float:
    """Process RSS high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def xla_peak_bytes(compiled) -> float | None:
    """Arguments + outputs + temporaries - aliased bytes of a compiled executable (None if unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)


def time_it(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn()`` (which must block until its results are ready)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class Interleaved:
    """A drop-in for :func:`time_it` (``--interleave``): records each method's warmed-up call and returns
    its (still empty) list of times; :meth:`run` then times the methods alternately, one call of each
    per repeat, so that a load spike hits them all about alike, and fills those lists in place."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, fn, repeats: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            fn()
        times: list[float] = []
        self.calls.append((fn, times))
        return times

    def run(self, repeats: int) -> None:
        for _ in range(repeats):
            for fn, times in self.calls:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)


def profile_thunks(run, out: str, calls: int = 2) -> "collections.Counter":
    """Milliseconds per call of every complete event (XLA thunk, PjRt call, ...) in a ``jax.profiler``
    trace of ``calls`` calls of ``run``, written under ``out``, by event name."""
    import collections
    import glob
    import gzip

    with jax.profiler.trace(out):
        for _ in range(calls):
            run()
    trace = sorted(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True))[-1]
    ms = collections.Counter()
    for e in json.load(gzip.open(trace))["traceEvents"]:
        if e.get("ph") == "X":
            ms[e.get("name", "")] += e.get("dur", 0) / 1e3 / calls
    return ms


def measure_peak(n: int, repeats: int) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` (best of ``repeats`` after warm-up)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    times = time_it(lambda: jax.block_until_ready(f(a, b)), max(repeats, 3), warmup=2)
    return 2.0 * n ** 3 / min(times)


def _takes_rank(local) -> bool:
    """Whether ``make_local_train``'s function takes a per-device ``rank`` (HetLoRA) argument."""
    return "rank" in inspect.signature(local).parameters


# ----------------------------------------------------------------------------------------------
# The three implementations
# ----------------------------------------------------------------------------------------------


def _inputs(setup: Setup, w: Work, seed: int):
    model = setup.model
    data = synthetic_data(model.cfg, w.M, w.E * w.B, w.T, seed)
    lora = init_lora(jax.random.PRNGKey(seed + 1), model.cfg, LoRAConfig(w.rank, w.alpha, w.targets))
    trainable = {"lora": lora} if setup.is_decoder else {"lora": lora, "head": setup.params["head"]}
    ids = np.arange(w.M, dtype=np.int32)
    weights = data.counts.astype(np.float32)
    return data, trainable, ids, weights, jax.random.PRNGKey(seed + 2)


def run_vmap(setup: Setup, w: Work, repeats: int, seed: int = 0, chunk_size: int | None = None,
             timer=time_it, prepared: bool = True) -> Result:
    """The vmapped group round; with ``w.cached > 0`` it starts from the bottom layers' cached outputs
    (``train.cache_frozen_layers``: computed once, before timing, as the driver does at set-up).
    ``prepared``: the base through :func:`~hfl_jax.models.layers.prepare_base`, as the driver passes it
    (bf16 on CPU: transposed frozen kernels for the backward pass); ``False`` (method ``vmap-plain``):
    the plain base, autodiff's own backward products."""
    model = setup.model
    data, trainable, ids, weights, key = _inputs(setup, w, seed)
    if w.cached:
        if w.cached > model.cfg.num_layers - w.d:
            raise ValueError(f"cannot cache {w.cached} layers at depth {w.d} of {model.cfg.num_layers}")
        data = attach_hidden(data, model, base_of(setup.params), w.cached)
    axis = DeviceAxis(chunk_size=chunk_size if chunk_size and chunk_size < w.M else None)
    group_round = make_group_round(model, optax.adam(w.lr), depth=w.d, local_steps=w.E, batch_size=w.B,
                                   n_max=data.n_max, axis=axis)
    base = prepare_base(model, base_of(setup.params)) if prepared else base_of(setup.params)
    args = jax.device_put((trainable, base, data, ids, weights, key))
    t0 = time.perf_counter()
    compiled = group_round.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = timer(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return Result("vmap-cache" if w.cached else ("vmap" if prepared else "vmap-plain"), w, compile_s, times, w.flops(model.cfg),
                  xla_peak_bytes(compiled), rss_peak_bytes(),
                  note=f"bottom {w.cached} layers from the frozen-layer cache" if w.cached else "")


def run_loop(setup: Setup, w: Work, repeats: int, seed: int = 0, timer=time_it) -> Result:
    model = setup.model
    data, trainable, ids, weights, key = _inputs(setup, w, seed)
    fn = make_local_train(model, optax.adam(w.lr), w.d, w.E, w.B, data.n_max)
    extra = (jnp.int32(w.rank),) if _takes_rank(fn) else ()
    local = jit(fn)  # the same XLA options as the vmapped round
    base = jax.device_put(prepare_base(model, base_of(setup.params)))
    trainable = jax.device_put(trainable)
    rows = [jax.device_put(data.row(m)) for m in range(w.M)]
    dev_ids = [jnp.int32(i) for i in ids]
    weights = jnp.asarray(weights)

    @jit
    def fedavg(results, weights):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
        return weighted_mean(stacked, weights, fallback=trainable)[0]

    t0 = time.perf_counter()
    compiled = local.lower(trainable, base, rows[0], key, dev_ids[0], *extra).compile()
    avg = fedavg.lower([trainable] * w.M, weights).compile()
    compile_s = time.perf_counter() - t0

    def one_round():
        results = [compiled(trainable, base, rows[m], key, dev_ids[m], *extra)[0] for m in range(w.M)]
        return jax.block_until_ready(avg(results, weights))

    times = timer(one_round, repeats)
    flops = w.flops(model.cfg)
    return Result("loop", w, compile_s, times, flops, xla_peak_bytes(compiled), rss_peak_bytes(),
                  note="XLA MiB is one device's call")


def _float32_head(head):
    """``head`` (the LM head, a torch ``Linear``) computed in float32 even under autocast, as hfl_jax
    computes a decoder's logits (``DecoderModel.logits``). Holds the same parameters (tying kept)."""
    import torch

    class Float32Head(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast(x.device.type, enabled=False):
                bias = None if self.inner.bias is None else self.inner.bias.float()
                return torch.nn.functional.linear(x.float(), self.inner.weight.float(), bias)

    return Float32Head(head)


def _torch_decoder(setup: Setup, attn: str | None = None, float32_head: bool = False):
    """transformers ``*ForCausalLM`` of the setup's config with hfl_jax's weights (``setup.hf_state``)."""
    import torch
    import transformers

    hf = setup.hf_config
    kw = {k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype", "model_type")}
    config = transformers.AutoConfig.for_model(hf["model_type"], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmodel = transformers.AutoModelForCausalLM.from_config(
            config, **({} if attn is None else {"attn_implementation": attn}))
    if setup.hf_state is None:
        raise RuntimeError("the decoder setup has no torch state (built without torch)")
    with torch.no_grad():
        missing, unexpected = tmodel.load_state_dict(setup.hf_state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:   # lm_head.weight: tied, absent
        raise RuntimeError(f"torch decoder weights: missing {missing}, unexpected {unexpected}")
    if float32_head:
        tmodel.lm_head = _float32_head(tmodel.lm_head)
    return tmodel


_LORA_NAME = re.compile(r"\.layers\.(\d+)\..*?(\w+)\.lora_([AB])\.")


def _set_peft_lora(params: dict, lora) -> None:
    """Copies hfl_jax adapters into a decoder's PEFT LoRA parameters ``{name: parameter}``
    (``lora_A.weight = A[l].T``, ``lora_B.weight = B[l].T``)."""
    import torch

    with torch.no_grad():
        for name, p in params.items():
            m = _LORA_NAME.search(name)
            if m:
                layer, target, factor = int(m.group(1)), m.group(2), m.group(3)
                p.copy_(torch.from_numpy(np.asarray(lora.weights[target][factor][layer]).T.copy()))


def _torch_peft_model(setup: Setup, w: Work, seed: int, device, attn: str | None = None, lora=None,
                      float32_head: bool = False):
    """transformers ``*ForSequenceClassification`` (encoders) or ``*ForCausalLM`` with hfl_jax's weights
    (decoders) + PEFT LoRA on ``w.targets`` on ``device`` (seeded), dropout off, with ``requires_grad``
    on exactly what hfl_jax trains: LoRA of the top ``w.d`` layers and the head (encoders; decoders
    have none). ``lora``: hfl_jax adapters to start from (decoders; default PEFT's initialisation);
    ``float32_head``: the decoder's LM head in float32 under autocast (:func:`_float32_head`).
    Returns ``(peft_model, {name: trainable parameter})``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = setup.model.cfg
    extra = {} if attn is None else {"attn_implementation": attn}
    if setup.is_decoder:
        tmodel = _torch_decoder(setup, attn, float32_head)
    elif setup.hf_dir is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tmodel = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(setup.hf_dir), num_labels=cfg.num_labels, **extra)
    else:
        kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
                  layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id, num_labels=cfg.num_labels,
                  **extra)
        if cfg.model_type == "roberta":
            tmodel = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**kw))
        else:
            tmodel = transformers.BertForSequenceClassification(transformers.BertConfig(**kw))
    tmodel.eval()  # no dropout: the JAX model has none
    tmodel.to(device)
    pmodel = get_peft_model(tmodel, LoraConfig(r=w.rank, lora_alpha=w.alpha, target_modules=list(w.targets),
                                               lora_dropout=0.0))
    L = cfg.num_layers
    trainable = {}
    for name, p in pmodel.named_parameters():
        if "lora_" in name:
            layer = int(re.search(r"\.layers?\.(\d+)\.", name).group(1))  # encoders .layer.i, decoders .layers.i
            p.requires_grad_(layer >= L - w.d)  # frozen bottom layers: no grad, hence no backward below them
        elif ".pooler." in name or ".classifier." in name:
            p.requires_grad_(True)  # the head (pooler + classifier) is trained, as in hfl_jax
        else:
            p.requires_grad_(False)
        if p.requires_grad:
            trainable[name] = p
    if lora is not None:   # every layer's adapters, frozen ones too (they still act in the forward pass)
        _set_peft_lora({n: p for n, p in pmodel.named_parameters() if "lora_" in n}, lora)
    return pmodel, trainable


def _torch_lm_loss(logits, labels):
    """``hfl_jax.objectives.causal_lm.token_loss`` in torch: the mean next-token cross-entropy (float32)
    over the batch's response tokens (``labels[:, t + 1] != -100`` scores ``logits[:, t]``), written
    without data-dependent indexing so that ``torch.func.vmap`` takes it."""
    import torch

    tgt = labels[:, 1:]
    keep = (tgt >= 0).float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.clamp(min=0).flatten(),
                                           reduction="none").view_as(keep)
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)


def _torch_loss(setup: Setup, model, batch: dict, mask=None):
    """The training loss of one batch (``{input_ids, attention_mask, token_type_ids, labels}``) through
    ``model`` (a module, or a ``functional_call`` closure taking the same keywords): cross-entropy on
    the head's logits (encoders), the causal-LM loss on response tokens (decoders, no KV cache).
    ``mask``: the attention mask to pass instead of ``batch["attention_mask"]`` (a prepared one)."""
    import torch

    am = batch["attention_mask"] if mask is None else mask
    if setup.is_decoder:
        out = model(input_ids=batch["input_ids"], attention_mask=am, use_cache=False)
        return _torch_lm_loss(out.logits, batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=am, token_type_ids=batch["token_type_ids"])
    return torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])


def _additive_mask(setup: Setup, attention_mask):
    """The additive float32 attention mask transformers would build, prepared so that its mask helpers
    (which branch on the mask's values, and ``vmap`` refuses that) pass it through: ``[B, 1, 1, T]``
    padding for encoders, ``[B, 1, T, T]`` causal and padding for decoders."""
    import torch

    neg = torch.finfo(torch.float32).min
    if not setup.is_decoder:
        return (1.0 - attention_mask[:, None, None, :].float()) * neg
    T = attention_mask.shape[-1]
    causal = torch.ones(T, T, device=attention_mask.device).tril()
    allowed = causal[None, None] * attention_mask[:, None, None, :].float()
    return (1.0 - allowed) * neg


def _torch_batches(setup: Setup, w: Work, seed: int, device):
    """The JAX runs' batches (``sample_batch_indices(round_key, device_id, ...)``) as int64 tensors
    ``{key: [M, E, B, T]}`` (labels ``[M, E, B]``), and the FedAvg weights ``[M]`` (sum 1)."""
    import torch

    data, _, ids, weights, key = _inputs(setup, w, seed)
    out = {k: [] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    for m in range(w.M):
        idx, _ = sample_batch_indices(key, int(ids[m]), int(data.counts[m]), data.n_max, w.E, w.B)
        idx = np.asarray(idx)
        for k in out:
            out[k].append(np.asarray(getattr(data, k))[m][idx])
    batches = {k: torch.from_numpy(np.stack(v).astype(np.int64)).to(device) for k, v in out.items()}
    return batches, torch.tensor(weights / float(weights.sum()), dtype=torch.float32, device=device)


def _torch_device(threads: int):
    import torch

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return device, sync


def make_torch_peft_round(setup: Setup, w: Work, seed: int = 0, device=None, autocast: bool = False, lora=None,
                          losses: list | None = None):
    """``one_round() -> {name: FedAvg of the devices' trained parameter}``: the PEFT loop (one device
    after another, each from the same start with a fresh ``torch.optim.Adam``, the same batches).
    ``autocast``: bf16 ``torch.autocast`` around each forward (the decoder's LM head in float32, as
    hfl_jax's); ``lora``: hfl_jax adapters to start from (decoders); ``losses``: a list that receives
    every step's loss as a float, device-major (for checks; it synchronises)."""
    import torch

    pmodel, trainable = _torch_peft_model(setup, w, seed, device, lora=lora,
                                          float32_head=autocast and setup.is_decoder)
    params = list(trainable.values())
    start = [p.detach().clone() for p in params]
    batches, wts = _torch_batches(setup, w, seed, device)

    def one_round():
        sums = [torch.zeros_like(p) for p in params]
        for m in range(w.M):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            opt = torch.optim.Adam(params, lr=w.lr)
            for e in range(w.E):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = _torch_loss(setup, pmodel, {k: v[m, e] for k, v in batches.items()})
                if losses is not None:
                    losses.append(float(loss))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for s, p in zip(sums, params):
                    s.add_(p, alpha=float(wts[m]))
        return dict(zip(trainable, sums))

    return pmodel, one_round


def make_torch_vmap_round(setup: Setup, w: Work, seed: int = 0, device=None, mode: str = "compile",
                          chunk: int | None = None, autocast: bool = False, weight_decay: float = 0.0, lora=None):
    """``one_round() -> {name: FedAvg of the devices' trained parameter}``: the strongest plain-PyTorch
    way. The devices' trainable parameters (LoRA of the top ``w.d`` layers, head) are stacked
    ``[chunk, ...]``; one local step of a whole chunk is ``torch.func.vmap(grad(loss))`` over them, the
    loss a ``torch.func.functional_call`` of the PEFT model with the frozen base unbatched (shared),
    then a hand-written AdamW on the stacked tensors (torch.optim.AdamW's formula; weight decay 0 is
    Adam, as the other methods). ``mode``: ``"eager"`` or ``"compile"`` (``torch.compile`` of the
    step); ``autocast``: bf16 ``torch.autocast`` around the forward/backward (masters, AdamW state
    float32); ``chunk``: devices per call (default all M). Attention is transformers' eager one,
    given the prepared additive mask (its mask helpers branch on data, which ``vmap`` refuses).
    Decoders: the causal-LM loss on response tokens, a ``[B, 1, T, T]`` causal mask, no KV cache, and
    under autocast the LM head in float32 (as hfl_jax's); ``lora``: hfl_jax adapters to start from."""
    import torch
    from torch.func import functional_call, grad, vmap

    pmodel, trainable = _torch_peft_model(setup, w, seed, device, attn="eager", lora=lora,
                                          float32_head=autocast and setup.is_decoder)
    frozen = {n: p.detach() for n, p in pmodel.named_parameters() if n not in trainable}
    frozen.update(dict(pmodel.named_buffers()))
    start = {n: p.detach().clone() for n, p in trainable.items()}
    batches, wts = _torch_batches(setup, w, seed, device)
    chunk = min(chunk or w.M, w.M)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def loss_fn(tr, input_ids, attention_mask, token_type_ids, labels):
        # the additive mask that transformers would build (a 4-D mask is taken as is; its 2-D path
        # branches on the mask's values, which vmap refuses)
        call = lambda **kw: functional_call(pmodel, (frozen, tr), args=(), kwargs=kw)  # noqa: E731
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)
        return _torch_loss(setup, call, batch, mask=_additive_mask(setup, attention_mask))

    grads_of = vmap(grad(loss_fn), in_dims=(0, 0, 0, 0, 0))

    def step(tr, m1, m2, t, input_ids, attention_mask, token_type_ids, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            g = grads_of(tr, input_ids, attention_mask, token_type_ids, labels)
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        new, n1, n2 = {}, {}, {}
        for k, p in tr.items():
            gk = g[k].float()
            n1[k] = b1 * m1[k] + (1.0 - b1) * gk
            n2[k] = b2 * m2[k] + (1.0 - b2) * gk * gk
            denom = n2[k].sqrt() / bc2.sqrt() + eps
            new[k] = p * (1.0 - w.lr * weight_decay) - (w.lr / bc1) * n1[k] / denom
        return new, n1, n2

    if mode == "compile":
        step = torch.compile(step)
    elif mode != "eager":
        raise ValueError(f"unknown torch vmap mode {mode!r}; eager or compile")

    def one_round():
        sums = {k: torch.zeros_like(p) for k, p in start.items()}
        for c0 in range(0, w.M, chunk):
            c1 = min(c0 + chunk, w.M)
            tr = {k: p.unsqueeze(0).repeat(c1 - c0, *(1,) * p.ndim) for k, p in start.items()}
            m1 = {k: torch.zeros_like(p) for k, p in tr.items()}
            m2 = {k: torch.zeros_like(p) for k, p in tr.items()}
            for e in range(w.E):
                b = {k: v[c0:c1, e] for k, v in batches.items()}
                t = torch.tensor(float(e + 1), device=device)  # a tensor: no torch.compile recompile per step
                tr, m1, m2 = step(tr, m1, m2, t, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                  b["labels"])
            for k in sums:
                sums[k] += torch.einsum("m,m...->...", wts[c0:c1], tr[k])
        return sums

    return pmodel, one_round


def run_torch(setup: Setup, w: Work, repeats: int, seed: int = 0, threads: int = 2, autocast: bool = False,
              timer=time_it) -> Result:
    """PyTorch + PEFT: the same model shape (and, for MiniLM and the decoders, the same weights), batches,
    E and Adam. ``autocast``: bf16 autocast (a decoder's LM head in float32)."""
    import torch

    device, sync = _torch_device(threads)
    pmodel, one_round = make_torch_peft_round(setup, w, seed, device, autocast=autocast)
    timed = lambda: (one_round(), sync())  # noqa: E731
    t0 = time.perf_counter()
    timed()  # warm-up (allocator, kernels); reported in the compile column
    warm = time.perf_counter() - t0
    times = timer(timed, repeats, warmup=0)
    attn = getattr(pmodel.config, "_attn_implementation", "?")
    load = os.getloadavg()[0]
    if device.type == "cpu" and threads >= (os.cpu_count() or 1) and load > 1.0:
        print(f"[torch: {threads} threads on {os.cpu_count()} cores at load {load:.1f}: PyTorch's backward degrades "
              f"badly when its threads lose a core; compare with --torch-threads 1]")
    return Result("torch", w, warm, times, w.flops(setup.model.cfg), None, rss_peak_bytes(),
                  note=f"torch {torch.__version__} on {device.type}"
                       f"{'' if device.type == 'cuda' else f', {threads} threads'}, attention={attn}"
                       f"{', bf16 autocast (LM head float32)' if autocast else ''}; "
                       f"compile column = first (warm-up) round")


def run_torch_vmap(setup: Setup, w: Work, repeats: int, seed: int = 0, threads: int = 2, mode: str = "compile",
                   chunk: int | None = None, autocast: bool = False, timer=time_it) -> Result:
    """The compiled (or eager) ``torch.func.vmap(grad)`` peer, :func:`make_torch_vmap_round`. On CUDA,
    float32 matmuls use TF32 (as JAX's default on the GPU does)."""
    import torch

    device, sync = _torch_device(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    _, one_round = make_torch_vmap_round(setup, w, seed, device, mode, chunk, autocast)
    timed = lambda: (one_round(), sync())  # noqa: E731
    t0 = time.perf_counter()
    timed()  # warm-up: torch.compile's compilation (mode compile) happens here
    warm = time.perf_counter() - t0
    times = timer(timed, repeats, warmup=0)
    peak = float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    return Result("torch-vmap", w, warm, times, w.flops(setup.model.cfg), peak, rss_peak_bytes(),
                  note=f"torch {torch.__version__} on {device.type}, func.vmap(grad) {mode}, "
                       f"{'bf16 autocast' if autocast else 'float32' + (' (TF32)' if device.type == 'cuda' else '')}"
                       f"{' (LM head float32)' if autocast and setup.is_decoder else ''}, "
                       f"{min(chunk or w.M, w.M)} devices per call; compile column = first round (with "
                       f"torch.compile); XLA MiB column = torch.cuda.max_memory_allocated")


# ----------------------------------------------------------------------------------------------
# Equivalence check (decoders)
# ----------------------------------------------------------------------------------------------


def _rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_decoder(setup: Setup, w: Work, seed: int = 0, threads: int = 2, autocast: bool = False) -> bool:
    """hfl_jax against PyTorch on the same weights, adapters (``B`` made non-zero so they matter) and
    batches; prints and returns whether they agree:

    1. the loss of device 0's first batch and its LoRA gradients: ``make_loss_fn`` (the causal-LM
       objective) vs the PEFT model's forward and backward;
    2. a whole group round: the per-step losses of the compiled vmapped round (``GroupRoundMetrics.loss``)
       vs the PEFT loop's, and the FedAvg'd adapters of the round vs the PEFT loop's and the eager
       ``torch.func.vmap`` peer's: ``||difference|| / ||update of the round||`` over all adapters, with
       the two torch peers against each other as the floor. (Adam divides by ``|g| + eps``, so an
       element whose gradient is near zero can move by up to ``lr`` more in one framework than in the
       other: a norm, not the largest element, says whether the rounds agree.)

    Tolerances: float32 1e-4 (losses, relative), 1e-3 (gradients), 1e-2 (adapters); under bf16 (hfl_jax's
    policy vs autocast: not the same rounding) 3e-2 on the loss only, the rest printed."""
    import torch

    from hfl_jax.fed.local import make_loss_fn

    device, _ = _torch_device(threads)
    model, base = setup.model, base_of(setup.params)
    data, trainable, ids, weights, key = _inputs(setup, w, seed)
    lora = trainable["lora"]
    lora = lora.replace(weights={t: dict(ab, B=0.02 * jax.random.normal(jax.random.fold_in(key, i), ab["B"].shape))
                                 for i, (t, ab) in enumerate(lora.weights.items())})
    trainable = {"lora": lora}
    batches, _ = _torch_batches(setup, w, seed, device)
    one = {k: v[0, 0] for k, v in batches.items()}
    jb = {k: jnp.asarray(v.cpu().numpy().astype(np.int32)) for k, v in one.items()}
    jb["mask"] = jnp.ones(w.B, bool)
    (loss_j, _), g_j = jax.value_and_grad(make_loss_fn(model, w.d), has_aux=True)(trainable, base, jb)
    pmodel, tr = _torch_peft_model(setup, w, seed, device, lora=lora, float32_head=autocast)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss_t = _torch_loss(setup, pmodel, one)
    loss_t.backward()
    g_rel = 0.0
    for name, p in tr.items():
        m = _LORA_NAME.search(name)
        g_rel = max(g_rel, _rel_diff(p.grad.cpu().numpy().T, g_j["lora"].weights[m.group(2)][m.group(3)][int(m.group(1))]))
    loss_rel = abs(float(loss_j) - float(loss_t.detach())) / abs(float(loss_t.detach()))
    prec = "bf16 (hfl_jax compute_dtype vs torch autocast)" if autocast else "float32"
    print(f"# check ({prec}): {setup.name} L={model.num_layers}, M={w.M} B={w.B} T={w.T} E={w.E} d={w.d} "
          f"rank {w.rank} on {'+'.join(w.targets)}, same weights, adapters (B ~ N(0, 0.02^2)) and batches")
    print(f"- step-1 loss of device 0's first batch: hfl_jax {float(loss_j):.7f}, PyTorch {float(loss_t.detach()):.7f} "
          f"(relative difference {loss_rel:.1e})")
    print(f"- its LoRA gradients: max |difference| / max |gradient| {g_rel:.1e} (over {len(tr)} tensors)")

    # a whole round, both torch peers starting from the same adapters
    group_round = make_group_round(model, optax.adam(w.lr), depth=w.d, local_steps=w.E, batch_size=w.B,
                                   n_max=data.n_max)
    agg, metrics = group_round(trainable, base, data, ids, weights, key)
    steps_t = []
    _, loop = make_torch_peft_round(setup, w, seed, device, autocast=autocast, lora=lora, losses=steps_t)
    _, peer = make_torch_vmap_round(setup, w, seed, device, mode="eager", autocast=autocast, lora=lora)
    got_loop, got_peer = loop(), peer()
    step_rel = _rel_diff(np.asarray(metrics.loss).reshape(-1), np.asarray(steps_t))
    print(f"- the round's {w.M}x{w.E} step losses: max relative difference {step_rel:.1e} "
          f"(hfl_jax device 0: {', '.join(f'{x:.5f}' for x in np.asarray(metrics.loss)[0])}; "
          f"PyTorch: {', '.join(f'{x:.5f}' for x in steps_t[:w.E])})")
    def as_jax_layout(got):   # {PEFT name: [out, in] or [r, in]} -> [(target, factor, layer, array)]
        out = []
        for name, t in got.items():
            m = _LORA_NAME.search(name)
            out.append(((m.group(2), m.group(3), int(m.group(1))), t.float().cpu().numpy().T))
        return dict(out)

    def rel(a: dict, b: dict) -> tuple[float, float]:   # ||a - b|| / ||update of the round||, max |a - b|
        num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
        den = sum(float(((b[k] - np.asarray(lora.weights[k[0]][k[1]][k[2]])) ** 2).sum()) for k in b)
        return (num / den) ** 0.5, max(float(np.abs(a[k] - b[k]).max()) for k in a)

    ref = {k: np.asarray(agg["lora"].weights[k[0]][k[1]][k[2]]) for k in as_jax_layout(got_loop)}
    loop_j, peer_j = as_jax_layout(got_loop), as_jax_layout(got_peer)
    diffs = {}
    for label, a, b in (("hfl_jax vs the PEFT loop", loop_j, ref), ("hfl_jax vs the torch.func.vmap peer", peer_j, ref),
                        ("the PEFT loop vs the torch.func.vmap peer (floor)", peer_j, loop_j)):
        diffs[label], worst = rel(a, b)
        print(f"- FedAvg'd adapters after the round, {label}: ||difference|| / ||update|| {diffs[label]:.1e}, "
              f"max |difference| {worst:.1e}")
    upd = max(float(np.abs(ref[k] - np.asarray(lora.weights[k[0]][k[1]][k[2]])).max()) for k in ref)
    print(f"  (largest update {upd:.1e}: lr x E = {w.lr * w.E:.1e})")
    if autocast:
        ok = loss_rel <= 3e-2
    else:
        ok = loss_rel <= 1e-4 and step_rel <= 1e-4 and g_rel <= 1e-3 and max(diffs.values()) <= 1e-2
    tol = "loss 3e-2, the rest informational" if autocast else "losses 1e-4, gradients 1e-3, adapters 1e-2"
    print(f"- {'agree' if ok else 'DISAGREE'} (tolerances: {tol})")
    return ok


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def table_rows(results: list[Result], peak: float) -> list[list[str]]:
    vmap = {r.work: r for r in results if r.method == "vmap"}
    rows = []
    for r in results:
        w = r.work
        ref = vmap.get(dataclasses.replace(w, cached=0))
        speedup = f"{r.median / ref.median:.2f}x" if ref is not None and r.method != "vmap" else "-"
        rows.append([r.method, str(w.M), str(w.B), str(w.T), str(w.E), str(w.d), _fmt(r.compile_s),
                     _fmt(r.best, 3), _fmt(r.median, 3), _fmt(w.examples / r.median, 1),
                     _fmt(w.examples * w.T / r.median, 0), _fmt(r.flops / r.median / 1e9, 1),
                     _fmt(100 * r.flops / r.median / peak, 1),
                     _fmt(r.xla_bytes / MiB if r.xla_bytes is not None else None, 1),
                     _fmt(r.rss_bytes / MiB, 0), speedup])
    return rows


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "nproc": os.cpu_count(), "cpu": cpu, "load": os.getloadavg(), "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()]}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " All sizes are per group round; timings are after compilation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="minilm-l6",
                   help="minilm-l6: the packaged pretrained MiniLM-L6 (6 layers, hidden 384); roberta-base-shape: "
                        "random weights, 12 layers, hidden 768, 12 heads, intermediate 3072, vocab 50265; "
                        "tiny: a 2-layer hidden-32 random BERT for smoke tests; *-shape decoders: a hub "
                        "checkpoint's widths and vocabulary (hfl_jax.models.DECODER_SHAPES) with --layers layers, "
                        "random weights (the same in hfl_jax and PyTorch), causal-LM loss on response tokens")
    p.add_argument("--layers", type=int, default=DECODER_LAYERS,
                   help="decoder shapes: number of layers (the checkpoint's own count for full depth: "
                        "smollm2-135m 30, qwen2.5-0.5b 24, llama-3.2-1b 16, mistral-7b 32)")
    p.add_argument("--devices", "-M", type=int, default=8, help="simulated devices M in the group")
    p.add_argument("--batch", "-B", type=int, default=2, help="per-device batch size B")
    p.add_argument("--seq-len", "-T", type=int, default=None,
                   help="sequence length T (all tokens real; default 64, 128 for the decoder shapes)")
    p.add_argument("--steps", "-E", type=int, default=2, help="local steps E per device")
    p.add_argument("--depth", "-d", type=int, default=None, help="fine-tuning depth d (default: all layers)")
    p.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r (on --targets)")
    p.add_argument("--targets", type=lambda s: tuple(t for t in s.split(",") if t), default=None,
                   help="comma-separated LoRA targets (default: query,value for encoders; q_proj,k_proj,v_proj,"
                        "o_proj,gate_proj,up_proj,down_proj for decoders)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--repeats", "-n", type=int, default=3, help="timed repeats per measurement (best and median)")
    p.add_argument("--methods", default="vmap,loop,torch",
                   help="comma-separated subset of vmap (one vmapped compiled call), loop (Python loop of a jitted "
                        "single-device step), torch (PyTorch + PEFT loop) and torch-vmap (torch.func.vmap(grad) over "
                        "stacked device adapters, functional_call, hand-written AdamW, --torch-vmap eager|compile); "
                        "the torch methods are skipped if torch/peft are missing")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads for the torch baselines")
    p.add_argument("--torch-vmap", choices=("eager", "compile"), default="compile",
                   help="torch-vmap method: torch.func.vmap(grad) step run eagerly or under torch.compile")
    p.add_argument("--torch-chunk", type=int, default=None,
                   help="torch-vmap method: devices per vmapped call (default all M)")
    p.add_argument("--torch-autocast", choices=("auto", "none", "bfloat16"), default="auto",
                   help="torch-vmap method: bf16 torch.autocast or none (auto: bfloat16 iff --compute-dtype is)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="hfl_jax precision (EncoderModel.compute_dtype; bfloat16: the mixed-precision policy of "
                        "hfl_jax/models/precision.py)")
    p.add_argument("--remat", choices=("none", "dots", "dense", "full"), default="none",
                   help="hfl_jax rematerialisation policy of the trained layers (EncoderModel.remat)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn", "einsum"), default="auto",
                   help="hfl_jax BERT/RoBERTa attention kernel (EncoderModel.attention)")
    p.add_argument("--unroll", type=int, default=None,
                   help="EncoderModel.unroll of the layer lax.scan (0 = unroll all layers; default: all layers "
                        "when L <= driver.UNROLL_MAX_LAYERS, else 1; the driver's model.unroll: auto "
                        "also weighs the backend and the hidden size)")
    p.add_argument("--peak-size", type=int, default=2048,
                   help="n of the n x n float32 matmul that measures the peak (at the start and the end of the run; "
                        "the higher is used)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="vmap at most this many devices at once (DeviceAxis.chunk_size: lax.map over chunks inside "
                        "the same compiled call); must divide M")
    p.add_argument("--cache-frozen", action="store_true",
                   help="also time the vmapped round with the bottom L-d layers served from the frozen-layer cache "
                        "(train.cache_frozen_layers), in the main comparison (when d < L) and the depth sweep")
    p.add_argument("--sweep", action="store_true",
                   help="also print scaling tables for the vmapped round over --sweep-devices, depths 1..L "
                        "(at M=--devices) and --sweep-batches (at M=--devices)")
    p.add_argument("--sweep-devices", type=_ints, default=[1, 8, 32, 80], help="M values of the device sweep")
    p.add_argument("--sweep-device-batch", type=int, default=4, help="B used in the device sweep")
    p.add_argument("--sweep-batches", type=_ints, default=[4, 16], help="B values of the batch sweep")
    p.add_argument("--sweep-depth-batch", type=int, default=4, help="B used in the depth sweep")
    p.add_argument("--sweep-only", action="store_true", help="skip the main comparison, print only the sweeps")
    p.add_argument("--json", type=Path, default=None, help="also write all results as JSON to this file")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, adapters and random weights")
    p.add_argument("--interleave", action="store_true",
                   help="build and warm up every method first, then time them alternately (one round of each per "
                        "repeat) so that load from other processes hits them alike; all methods' models stay in "
                        "memory together. The matmul peak and load are printed before and after")
    p.add_argument("--check", action="store_true",
                   help="decoder shapes: instead of timing, check that hfl_jax and PyTorch agree on the same "
                        "weights, adapters and batches (step-1 loss and gradients, a whole round's step losses "
                        "and FedAvg'd adapters vs the PEFT loop and the eager torch.func.vmap peer) at "
                        "--compute-dtype; exit status 1 if not")
    return p.parse_args(argv)


def _result_json(r: Result) -> dict:
    return {"method": r.method, **dataclasses.asdict(r.work), "compile_s": r.compile_s, "times": r.times,
            "flops": r.flops, "xla_bytes": r.xla_bytes, "rss_bytes": r.rss_bytes, "note": r.note}


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {METHODS}")
    if "torch" in methods or "torch-vmap" in methods:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            print(f"[torch baselines skipped: {e}]")
            methods = [m for m in methods if not m.startswith("torch")]
    dtype = None if args.compute_dtype == "float32" else jnp.bfloat16
    setup = build_model(args.model, dtype, args.seed, True if args.unroll == 0 else (args.unroll or 1), args.layers)
    cfg = setup.model.cfg
    targets = args.targets or setup.targets
    if args.seq_len is None:
        args.seq_len = 128 if setup.is_decoder else 64
    autocast = args.torch_autocast == "bfloat16" or (args.torch_autocast == "auto" and dtype is not None)
    if args.unroll is None:
        from hfl_jax.driver import UNROLL_MAX_LAYERS
        args.unroll = 0 if cfg.num_layers <= UNROLL_MAX_LAYERS else 1
        setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, unroll=args.unroll == 0 or 1))
    setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, remat=args.remat,
                                                                 attention=args.attention))
    L = cfg.num_layers
    depth = L if args.depth is None else args.depth
    if args.check:
        if not setup.is_decoder:
            raise SystemExit("--check compares hfl_jax with PyTorch for the decoder shapes "
                             "(encoders: tests/test_torch_vmap_peer.py, tests/test_models.py)")
        w = Work(args.devices, args.batch, args.seq_len, args.steps, depth, args.rank, args.alpha, args.lr,
                 targets=targets)
        return 0 if check_decoder(setup, w, args.seed, args.torch_threads, autocast) else 1
    info = machine_info()
    print(f"# round_speed: {args.model} (L={L}, H={cfg.hidden_size}, vocab {cfg.vocab_size}), rank {args.rank} "
          f"on {'+'.join(targets)}, {'causal-LM loss on response tokens' if setup.is_decoder else 'classification'}, "
          f"compute dtype {args.compute_dtype}, remat {args.remat}, attention {args.attention}, "
          f"layer scan unroll {args.unroll or 'all'}, "
          f"XLA options {dict(compiler_options()) or 'none'} (hfl_jax.fed.xla)")
    print(f"# {info['date']}  nproc={info['nproc']}  cpu={info['cpu']}  load(1,5,15)="
          f"{', '.join(f'{x:.2f}' for x in info['load'])}  jax {info['jax']} {info['jax_devices']}")
    peaks = [measure_peak(args.peak_size, args.repeats)]
    print(f"# matmul peak (jitted float32 {args.peak_size}x{args.peak_size} @ {args.peak_size}x{args.peak_size}, "
          f"best of {max(args.repeats, 3)}): {peaks[0] / 1e9:.1f} GFLOP/s at the start")

    def peak_now() -> float:
        """Remeasures the peak (load from other processes varies) and returns the highest seen."""
        peaks.append(measure_peak(args.peak_size, args.repeats))
        print(f"# matmul peak remeasured: {peaks[-1] / 1e9:.1f} GFLOP/s; using the highest, {max(peaks) / 1e9:.1f}; "
              f"load(1,5,15)={', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        out["peak_flops"] = max(peaks)
        return max(peaks)
    print(f"# timings: best/median of {args.repeats} repeats after warm-up; FLOPs = timemodel.step_flops x E x M; "
          f"XLA MiB = arguments+outputs+temps-aliased of the compiled call; RSS MiB = process high-water mark so far")
    out = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "peak_flops": peaks[0],
           "main": [], "sweep": {}}

    timer = Interleaved() if args.interleave else time_it
    runners = {"vmap": lambda s, w, n, seed: run_vmap(s, w, n, seed, args.chunk_size, timer=timer),
               "vmap-plain": lambda s, w, n, seed: run_vmap(s, w, n, seed, args.chunk_size, timer=timer,
                                                            prepared=False),
               "loop": lambda s, w, n, seed: run_loop(s, w, n, seed, timer=timer),
               # the PEFT loop under the same bf16 autocast as the vmapped peer (same-precision peers, issue 28)
               "torch": lambda s, w, n, seed: run_torch(s, w, n, seed, args.torch_threads, autocast, timer=timer),
               "torch-vmap": lambda s, w, n, seed: run_torch_vmap(
                   s, w, n, seed, args.torch_threads, args.torch_vmap, args.torch_chunk, autocast, timer=timer)}
    if not args.sweep_only:
        w = Work(args.devices, args.batch, args.seq_len, args.steps, depth, args.rank, args.alpha, args.lr,
                 targets=targets)
        results = []
        for m in methods:
            results.append(runners[m](setup, w, args.repeats, args.seed))
        if args.cache_frozen and depth < L:
            results.append(run_vmap(setup, dataclasses.replace(w, cached=L - depth), args.repeats, args.seed,
                                    args.chunk_size, timer=timer))
        if args.interleave:
            peak_now()
            print(f"# timing {len(timer.calls)} methods interleaved, {args.repeats} rounds of each")
            timer.run(args.repeats)
        peak = peak_now()
        print()
        print(markdown(COLUMNS, table_rows(results, peak)))
        for r in results:
            if r.note:
                print(f"- {r.method}: {r.note}")
        by = {r.method: r for r in results}
        if "vmap" in by:
            for m in ("loop", "torch", "torch-vmap"):
                if m in by:
                    print(f"- speedup of vmap over {m}: {by[m].median / by['vmap'].median:.2f}x (ratio of median times)")
            print(f"- vmap achieved {100 * by['vmap'].flops / by['vmap'].median / peak:.1f}% of the matmul peak")
            if "vmap-cache" in by:
                print(f"- frozen-layer cache (bottom {L - depth} layers): {by['vmap-cache'].median / by['vmap'].median:.2f}x "
                      f"the time of the uncached vmapped round at the same depth")
        out["main"] = [_result_json(r) for r in results]

    if args.sweep:
        base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base_of(setup.params)))

        def sweep(title, works, key):
            res = [run_vmap(setup, w, args.repeats, args.seed, args.chunk_size) for w in works]
            peak = peak_now()
            print(f"\n### {title}\n")
            hdr = ["M", "B", "d", "cached", "compile s", "median s", "s / device", "s / local step", "examples/s",
                   "GFLOP/s", "% peak", "XLA MiB", "XLA MiB / device", "M copies of base MiB", "RSS MiB"]
            rows = []
            for r in res:
                w = r.work
                rows.append([str(w.M), str(w.B), str(w.d), str(w.cached), _fmt(r.compile_s), _fmt(r.median, 3),
                             _fmt(r.median / w.M, 3), _fmt(r.median / w.E, 3), _fmt(w.examples / r.median, 1),
                             _fmt(r.flops / r.median / 1e9, 1), _fmt(100 * r.flops / r.median / peak, 1),
                             _fmt(r.xla_bytes / MiB if r.xla_bytes else None, 1),
                             _fmt(r.xla_bytes / MiB / w.M if r.xla_bytes else None, 2),
                             _fmt(w.M * base_bytes / MiB, 0), _fmt(r.rss_bytes / MiB, 0)])
            print(markdown(hdr, rows))
            out["sweep"][key] = [_result_json(r) for r in res]
            return res

        mk = lambda M, B, d: Work(M, B, args.seq_len, args.steps, d, args.rank, args.alpha, args.lr,  # noqa: E731
                                  targets=targets)
        print(f"\n# sweeps (vmapped round; T={args.seq_len}, E={args.steps}; base model = {base_bytes / MiB:.1f} MiB)")
        sweep(f"devices M (B={args.sweep_device_batch}, d={depth})",
              [mk(M, args.sweep_device_batch, depth) for M in args.sweep_devices], "devices")
        res = sweep(f"depth d (M={args.devices}, B={args.sweep_depth_batch})",
                    [mk(args.devices, args.sweep_depth_batch, d) for d in range(1, L + 1)], "depth")
        full, full_flops = res[-1].median, res[-1].flops
        print("\n" + "\n".join(f"- depth {r.work.d}/{L}: time per local step {r.median / full:.2f}x full depth "
                               f"(FLOPs {r.flops / res[-1].flops:.2f}x)" for r in res))
        if args.cache_frozen:
            res = sweep(f"depth d with the frozen-layer cache (bottom L-d layers cached; M={args.devices}, "
                        f"B={args.sweep_depth_batch})",
                        [dataclasses.replace(mk(args.devices, args.sweep_depth_batch, d), cached=L - d)
                         for d in range(1, L)], "depth_cached")
            print("\n" + "\n".join(f"- depth {r.work.d}/{L} with the cache: time per local step {r.median / full:.2f}x "
                                   f"full depth without it (FLOPs {r.flops / full_flops:.2f}x)" for r in res))
        sweep(f"batch B (M={args.devices}, d={depth})",
              [mk(args.devices, B, depth) for B in args.sweep_batches], "batch")

    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
