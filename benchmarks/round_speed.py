"""Speed of one group's local round: vmapped (one compiled call) vs a Python loop vs PyTorch + PEFT.

Times E local steps of M simulated devices (per-device batch B, sequence length
T, fine-tuning depth d, LoRA rank r on query+value) after compilation, three ways:

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

Reports examples/s, tokens/s, achieved FLOP/s from the analytic count
(``hfl_jax.fed.timemodel.step_flops`` x E x M), the machine's matmul peak
measured in the same run, XLA's memory analysis of the compiled call, the
process RSS high-water mark and compile time. ``--sweep`` adds scaling tables
over devices M, depth d and batch B for the vmapped round.

Example::

    python benchmarks/round_speed.py --model minilm-l6 --devices 8 --batch 2 --seq-len 64
    python benchmarks/round_speed.py --model minilm-l6 --sweep --methods vmap
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
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
from hfl_jax.fed.timemodel import layer_forward_flops, step_flops  # noqa: E402
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora  # noqa: E402

TARGETS = ("query", "value")
MODELS = ("tiny", "minilm-l6", "roberta-base-shape")
METHODS = ("vmap", "loop", "torch", "torch-vmap")
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
    model: EncoderModel
    params: dict
    hf_dir: Path | None  # packaged checkpoint (for the torch baseline), None for random models


def build_model(name: str, compute_dtype=None, seed: int = 0, unroll: int | bool = 1) -> Setup:
    """The model under test: packaged MiniLM, a random RoBERTa-base shape, or a tiny random BERT."""
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


def synthetic_data(cfg: EncoderConfig, M: int, n_per_device: int, T: int, seed: int = 0):
    """Random full-length sequences: M devices of ``n_per_device`` rows each (host numpy)."""
    rng = np.random.default_rng(seed)
    n = M * n_per_device
    tok = {"input_ids": rng.integers(5, cfg.vocab_size, (n, T)).astype(np.int32),
           "attention_mask": np.ones((n, T), np.int32),
           "token_type_ids": np.zeros((n, T), np.int32),
           "labels": rng.integers(0, cfg.num_labels, n).astype(np.int32)}
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

    @property
    def examples(self) -> int:
        return self.M * self.E * self.B

    def flops(self, cfg) -> float:
        """Counted FLOPs of the round: ``step_flops x E x M``, less the cached layers' forward."""
        per_step = step_flops(cfg, self.B, self.T, self.d, self.rank, TARGETS)
        per_step -= self.cached * layer_forward_flops(cfg, self.B, self.T, self.rank, TARGETS)
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
    lora = init_lora(jax.random.PRNGKey(seed + 1), model.cfg, LoRAConfig(w.rank, w.alpha, TARGETS))
    trainable = {"lora": lora, "head": setup.params["head"]}
    ids = np.arange(w.M, dtype=np.int32)
    weights = data.counts.astype(np.float32)
    return data, trainable, ids, weights, jax.random.PRNGKey(seed + 2)


def run_vmap(setup: Setup, w: Work, repeats: int, seed: int = 0, chunk_size: int | None = None) -> Result:
    """The vmapped group round; with ``w.cached > 0`` it starts from the bottom layers' cached outputs
    (``train.cache_frozen_layers``: computed once, before timing, as the driver does at set-up)."""
    model = setup.model
    data, trainable, ids, weights, key = _inputs(setup, w, seed)
    if w.cached:
        if w.cached > model.cfg.num_layers - w.d:
            raise ValueError(f"cannot cache {w.cached} layers at depth {w.d} of {model.cfg.num_layers}")
        data = attach_hidden(data, model, base_of(setup.params), w.cached)
    axis = DeviceAxis(chunk_size=chunk_size if chunk_size and chunk_size < w.M else None)
    group_round = make_group_round(model, optax.adam(w.lr), depth=w.d, local_steps=w.E, batch_size=w.B,
                                   n_max=data.n_max, axis=axis)
    args = jax.device_put((trainable, base_of(setup.params), data, ids, weights, key))
    t0 = time.perf_counter()
    compiled = group_round.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = time_it(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return Result("vmap-cache" if w.cached else "vmap", w, compile_s, times, w.flops(model.cfg),
                  xla_peak_bytes(compiled), rss_peak_bytes(),
                  note=f"bottom {w.cached} layers from the frozen-layer cache" if w.cached else "")


def run_loop(setup: Setup, w: Work, repeats: int, seed: int = 0) -> Result:
    model = setup.model
    data, trainable, ids, weights, key = _inputs(setup, w, seed)
    fn = make_local_train(model, optax.adam(w.lr), w.d, w.E, w.B, data.n_max)
    extra = (jnp.int32(w.rank),) if _takes_rank(fn) else ()
    local = jit(fn)  # the same XLA options as the vmapped round
    base = jax.device_put(base_of(setup.params))
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

    times = time_it(one_round, repeats)
    flops = w.flops(model.cfg)
    return Result("loop", w, compile_s, times, flops, xla_peak_bytes(compiled), rss_peak_bytes(),
                  note="XLA MiB is one device's call")


def _torch_peft_model(setup: Setup, w: Work, seed: int, device, attn: str | None = None):
    """transformers ``*ForSequenceClassification`` + PEFT LoRA on ``device`` (seeded), dropout off, with
    ``requires_grad`` on exactly what hfl_jax trains: LoRA of the top ``w.d`` layers and the head.
    Returns ``(peft_model, {name: trainable parameter})``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = setup.model.cfg
    extra = {} if attn is None else {"attn_implementation": attn}
    if setup.hf_dir is not None:
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
    pmodel = get_peft_model(tmodel, LoraConfig(r=w.rank, lora_alpha=w.alpha, target_modules=list(TARGETS),
                                               lora_dropout=0.0))
    L = cfg.num_layers
    trainable = {}
    for name, p in pmodel.named_parameters():
        if "lora_" in name:
            layer = int(name.split(".layer.")[1].split(".")[0])
            p.requires_grad_(layer >= L - w.d)  # frozen bottom layers: no grad, hence no backward below them
        elif ".pooler." in name or ".classifier." in name:
            p.requires_grad_(True)  # the head (pooler + classifier) is trained, as in hfl_jax
        else:
            p.requires_grad_(False)
        if p.requires_grad:
            trainable[name] = p
    return pmodel, trainable


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


def make_torch_peft_round(setup: Setup, w: Work, seed: int = 0, device=None):
    """``one_round() -> {name: FedAvg of the devices' trained parameter}``: the PEFT loop (one device
    after another, each from the same start with a fresh ``torch.optim.Adam``, the same batches)."""
    import torch

    pmodel, trainable = _torch_peft_model(setup, w, seed, device)
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
                out = pmodel(input_ids=batches["input_ids"][m, e], attention_mask=batches["attention_mask"][m, e],
                             token_type_ids=batches["token_type_ids"][m, e])
                loss = torch.nn.functional.cross_entropy(out.logits, batches["labels"][m, e])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for s, p in zip(sums, params):
                    s.add_(p, alpha=float(wts[m]))
        return dict(zip(trainable, sums))

    return pmodel, one_round


def make_torch_vmap_round(setup: Setup, w: Work, seed: int = 0, device=None, mode: str = "compile",
                          chunk: int | None = None, autocast: bool = False, weight_decay: float = 0.0):
    """``one_round() -> {name: FedAvg of the devices' trained parameter}``: the strongest plain-PyTorch
    way. The devices' trainable parameters (LoRA of the top ``w.d`` layers, head) are stacked
    ``[chunk, ...]``; one local step of a whole chunk is ``torch.func.vmap(grad(loss))`` over them, the
    loss a ``torch.func.functional_call`` of the PEFT model with the frozen base unbatched (shared),
    then a hand-written AdamW on the stacked tensors (torch.optim.AdamW's formula; weight decay 0 is
    Adam, as the other methods). ``mode``: ``"eager"`` or ``"compile"`` (``torch.compile`` of the
    step); ``autocast``: bf16 ``torch.autocast`` around the forward/backward (masters, AdamW state
    float32); ``chunk``: devices per call (default all M). Attention is transformers' eager one,
    given the prepared additive mask (its mask helpers branch on data, which ``vmap`` refuses)."""
    import torch
    from torch.func import functional_call, grad, vmap

    pmodel, trainable = _torch_peft_model(setup, w, seed, device, attn="eager")
    frozen = {n: p.detach() for n, p in pmodel.named_parameters() if n not in trainable}
    frozen.update(dict(pmodel.named_buffers()))
    start = {n: p.detach().clone() for n, p in trainable.items()}
    batches, wts = _torch_batches(setup, w, seed, device)
    chunk = min(chunk or w.M, w.M)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def loss_fn(tr, input_ids, attention_mask, token_type_ids, labels):
        # the additive [B, 1, 1, T] mask that transformers would build (a 4-D mask is taken as is; its
        # 2-D path branches on the mask's values, which vmap refuses)
        bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        out = functional_call(pmodel, (frozen, tr), args=(),
                              kwargs=dict(input_ids=input_ids, attention_mask=bias, token_type_ids=token_type_ids))
        return torch.nn.functional.cross_entropy(out.logits.float(), labels)

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


def run_torch(setup: Setup, w: Work, repeats: int, seed: int = 0, threads: int = 2) -> Result:
    """PyTorch + PEFT: the same model shape (and, for MiniLM, the same weights), batches, E and Adam."""
    import torch

    device, sync = _torch_device(threads)
    pmodel, one_round = make_torch_peft_round(setup, w, seed, device)
    timed = lambda: (one_round(), sync())  # noqa: E731
    t0 = time.perf_counter()
    timed()  # warm-up (allocator, kernels); reported in the compile column
    warm = time.perf_counter() - t0
    times = time_it(timed, repeats, warmup=0)
    attn = getattr(pmodel.config, "_attn_implementation", "?")
    load = os.getloadavg()[0]
    if device.type == "cpu" and threads >= (os.cpu_count() or 1) and load > 1.0:
        print(f"[torch: {threads} threads on {os.cpu_count()} cores at load {load:.1f}: PyTorch's backward degrades "
              f"badly when its threads lose a core; compare with --torch-threads 1]")
    return Result("torch", w, warm, times, w.flops(setup.model.cfg), None, rss_peak_bytes(),
                  note=f"torch {torch.__version__} on {device.type}"
                       f"{'' if device.type == 'cuda' else f', {threads} threads'}, attention={attn}; "
                       f"compile column = first (warm-up) round")


def run_torch_vmap(setup: Setup, w: Work, repeats: int, seed: int = 0, threads: int = 2, mode: str = "compile",
                   chunk: int | None = None, autocast: bool = False) -> Result:
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
    times = time_it(timed, repeats, warmup=0)
    peak = float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    return Result("torch-vmap", w, warm, times, w.flops(setup.model.cfg), peak, rss_peak_bytes(),
                  note=f"torch {torch.__version__} on {device.type}, func.vmap(grad) {mode}, "
                       f"{'bf16 autocast' if autocast else 'float32' + (' (TF32)' if device.type == 'cuda' else '')}, "
                       f"{min(chunk or w.M, w.M)} devices per call; compile column = first round (with "
                       f"torch.compile); XLA MiB column = torch.cuda.max_memory_allocated")


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
                        "tiny: a 2-layer hidden-32 random BERT for smoke tests")
    p.add_argument("--devices", "-M", type=int, default=8, help="simulated devices M in the group")
    p.add_argument("--batch", "-B", type=int, default=2, help="per-device batch size B")
    p.add_argument("--seq-len", "-T", type=int, default=64, help="sequence length T (all tokens real)")
    p.add_argument("--steps", "-E", type=int, default=2, help="local steps E per device")
    p.add_argument("--depth", "-d", type=int, default=None, help="fine-tuning depth d (default: all layers)")
    p.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r (targets: query, value)")
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
    setup = build_model(args.model, dtype, args.seed, True if args.unroll == 0 else (args.unroll or 1))
    cfg = setup.model.cfg
    if args.unroll is None:
        from hfl_jax.driver import UNROLL_MAX_LAYERS
        args.unroll = 0 if cfg.num_layers <= UNROLL_MAX_LAYERS else 1
        setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, unroll=args.unroll == 0 or 1))
    setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, remat=args.remat,
                                                                 attention=args.attention))
    L = cfg.num_layers
    depth = L if args.depth is None else args.depth
    info = machine_info()
    print(f"# round_speed: {args.model} (L={L}, H={cfg.hidden_size}), rank {args.rank} on {'+'.join(TARGETS)}, "
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
        print(f"# matmul peak remeasured: {peaks[-1] / 1e9:.1f} GFLOP/s; using the highest, {max(peaks) / 1e9:.1f}")
        out["peak_flops"] = max(peaks)
        return max(peaks)
    print(f"# timings: best/median of {args.repeats} repeats after warm-up; FLOPs = timemodel.step_flops x E x M; "
          f"XLA MiB = arguments+outputs+temps-aliased of the compiled call; RSS MiB = process high-water mark so far")
    out = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "peak_flops": peaks[0],
           "main": [], "sweep": {}}

    runners = {"vmap": lambda s, w, n, seed: run_vmap(s, w, n, seed, args.chunk_size), "loop": run_loop,
               "torch": lambda s, w, n, seed: run_torch(s, w, n, seed, args.torch_threads),
               "torch-vmap": lambda s, w, n, seed: run_torch_vmap(
                   s, w, n, seed, args.torch_threads, args.torch_vmap, args.torch_chunk,
                   args.torch_autocast == "bfloat16" or (args.torch_autocast == "auto" and dtype is not None))}
    if not args.sweep_only:
        w = Work(args.devices, args.batch, args.seq_len, args.steps, depth, args.rank, args.alpha, args.lr)
        results = []
        for m in methods:
            results.append(runners[m](setup, w, args.repeats, args.seed))
        if args.cache_frozen and depth < L:
            results.append(run_vmap(setup, dataclasses.replace(w, cached=L - depth), args.repeats, args.seed,
                                    args.chunk_size))
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

        mk = lambda M, B, d: Work(M, B, args.seq_len, args.steps, d, args.rank, args.alpha, args.lr)  # noqa: E731
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
