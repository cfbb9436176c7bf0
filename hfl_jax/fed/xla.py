"""Compiler options for hfl_jax's compiled calls (``jit`` here is ``jax.jit`` plus them).

On CPU, XLA (jaxlib 0.10, YNNPACK backend) by default fuses elementwise producers and
consumers into its YNNPACK dot kernels (LayerNorm, GELU and softmax backward pulled into
the matmuls). On the MiniLM group round those fused kernels are slower than plain dots
followed by XLA's own loop fusions: 1.78 -> 1.52 s per round at M=4, B=16, T=64
(``benchmarks/RESULTS.md``). :func:`jit` therefore compiles with
``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`` when

* the default backend is CPU,
* this jaxlib knows the option (probed once by compiling a one-op function), and
* neither ``XLA_FLAGS`` already sets a ``ynn_fusion_type`` nor ``HFL_XLA_DEFAULT_FUSION=1`` is set;

otherwise it passes no option. Only how XLA groups the same operations changes, so results
agree to float rounding (the tests compare fused and unfused calls).

Threefry on CPU: JAX lowers its Threefry-2x32 hash (every ``jax.random`` draw) on CPU as a rolled
5-iteration loop, elsewhere unrolled. Unrolled, XLA:CPU compiles a random program several times faster
(one ``uniform``: 0.49 -> 0.09 s; the smoke run cold: ~1.5 s of ~15 s, ``benchmarks/RESULTS.md``) and
the hash is the same integer arithmetic, so every random bit is unchanged (``tests/test_xla_options.py``).
:func:`use_unrolled_threefry` registers JAX's own unrolled rule for CPU (``hfl_jax.driver.build`` calls
it; ``HFL_THREEFRY=rolled`` keeps JAX's default); it does nothing where that rule is not found.

Ahead-of-time compilation: every function :func:`jit` returns has ``precompile(*args, **kw)``,
which lowers and compiles it for those arguments' shapes, dtypes and shardings and keeps the
executable; later calls with a matching signature run it without tracing or compiling
(``hfl_jax.driver.precompile`` compiles a run's programs this way, concurrently, before round 1).
"""
from __future__ import annotations

import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=1)
def compiler_options() -> tuple[tuple[str, str], ...]:
    """The options :func:`jit` passes, as sorted ``(name, value)`` pairs (empty: none)."""
    if os.environ.get("HFL_XLA_DEFAULT_FUSION", "") not in ("", "0"):
        return ()
    if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return ()
    if jax.default_backend() != "cpu":
        return ()
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(CPU_OPTIONS)).lower(jnp.float32(0)).compile()
    except Exception:  # noqa: BLE001  (an unknown option: another jaxlib)
        return ()
    return tuple(sorted(CPU_OPTIONS.items()))


@functools.lru_cache(maxsize=1)
def use_unrolled_threefry() -> bool:
    """Lowers Threefry-2x32 unrolled on CPU (module docstring); ``True`` if it did. Process-wide and
    idempotent; affects programs compiled afterwards only."""
    if os.environ.get("HFL_THREEFRY", "") == "rolled" or jax.default_backend() != "cpu":
        return False
    try:
        from jax._src.random import threefry2x32 as threefry
        from jax.extend.random import threefry2x32_p
        from jax.interpreters import mlir

        rule = threefry._threefry2x32_lowering_rule   # JAX's unrolled rule (its default off CPU)
    except (ImportError, AttributeError):   # another JAX: keep its lowering
        return False
    mlir.register_lowering(threefry2x32_p, rule, platform="cpu")
    return True


def _leaf_signature(x) -> tuple:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        sharding = None   # the default placement: a committed single-device array or a host value
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), sharding
    a = np.asarray(x)   # a Python scalar: weakly typed
    return a.shape, str(jnp.asarray(x).dtype), True, None


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a compiled executable depends on: the arguments' tree structure and each leaf's
    shape, dtype, weak type and (non-default) sharding."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    return treedef, tuple(_leaf_signature(x) for x in leaves)


def jit(fun=None, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` (usable as a decorator).

    JAX accepts compiler options only on a top-level call, so a call made while tracing (the
    function inside a user's ``jax.jit``, ``grad`` or ``vmap``, as in the notebook) goes through the
    plain ``jax.jit``; the outer compilation then decides. ``.lower`` is the top-level one's.
    ``.precompile(*args, **kw)`` compiles ahead of time for those arguments (module docstring);
    it may be called from several threads at once.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    plain = jax.jit(fun, **kwargs)
    opts = dict(compiler_options())
    fast = jax.jit(fun, compiler_options=opts, **kwargs) if opts else plain
    compiled: dict = {}           # signature -> jax.stages.Compiled
    pending: dict = {}            # signature -> threading.Event set once its compilation ended
    lock = threading.Lock()

    @functools.wraps(fun)
    def call(*args, **kw):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kw))):
            return plain(*args, **kw)
        if compiled:
            exe = compiled.get(signature(args, kw))
            if exe is not None:
                return exe(*args, **kw)
        if not opts:
            return plain(*args, **kw)
        try:
            return fast(*args, **kw)
        except ValueError as e:  # nested under a trace without traced arguments
            if "compiler_options" not in str(e):
                raise
            return plain(*args, **kw)

    def precompile(*args, **kw):
        key = signature(args, kw)
        with lock:
            if key in compiled:
                return compiled[key]
            first = key not in pending
            if first:   # the first caller compiles; concurrent callers with this signature wait for it
                pending[key] = threading.Event()
            done = pending[key]
        if not first:
            done.wait()
            if key in compiled:
                return compiled[key]
            return fast.lower(*args, **kw).compile()   # the first caller failed: fail (or succeed) here too
        try:
            exe = fast.lower(*args, **kw).compile()
            with lock:
                compiled[key] = exe
            return exe
        finally:
            done.set()

    call.lower = fast.lower
    call.precompile = precompile
    call.compiled = compiled
    return call
