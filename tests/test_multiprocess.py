"""Multi-process (multi-host) group round == single-process unsharded round.

Two CPU processes join through ``jax.distributed.initialize`` (cross-process
collectives via gloo, jax's default on CPU), each with two fake host devices,
so the global mesh has four devices in two processes. Every process holds the
full host data; :meth:`DeviceAxis.put` builds the global arrays with
``make_array_from_callback``. The aggregated trainable comes back replicated, so
each process can read it, and both must equal an unsharded run in this process.
"""
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine_fixtures import OPT, setup
from hfl_jax.fed.engine import make_group_round
from hfl_jax.fed.local import base_of

E, B, DEPTH, CHUNKS = 3, 4, 2, (None, 4)
TIMEOUT_S = 300
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workers import hfl_jax from here

WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid = int(sys.argv[1])
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    import numpy as np
    from engine_fixtures import OPT, setup
    from hfl_jax.fed.device_axis import DeviceAxis, make_mesh
    from hfl_jax.fed.engine import make_group_round
    from hfl_jax.fed.local import base_of
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2, jax.devices()
    model, params, trainable, data, sizes = setup()
    ids, key = np.arange(8, dtype=np.int32), jax.random.PRNGKey(3)
    out = {{}}
    for chunk in {chunks!r}:
        axis = DeviceAxis(make_mesh(), chunk_size=chunk)
        sharded_data = axis.put(data)
        leaf = jax.tree.leaves(sharded_data)[0]
        assert not leaf.is_fully_addressable and len(leaf.sharding.device_set) == 4
        agg, metrics = make_group_round(model, OPT, depth={depth}, local_steps={E}, batch_size={B}, n_max=data.n_max,
                                         axis=axis)(
            axis.replicate(trainable), axis.replicate(base_of(params)), sharded_data, axis.put(ids),
            axis.put(sizes), axis.replicate(key))
        for i, x in enumerate(jax.tree.leaves(agg)):
            assert x.is_fully_replicated, (i, x.sharding)
            out[f"{{chunk}}/agg{{i}}"] = np.asarray(x)
        out[f"{{chunk}}/loss"] = np.asarray(metrics.loss)
    np.savez(os.path.join({outdir!r}, f"result{{pid}}.npz"), **out)
    jax.distributed.shutdown()
    print("WORKER_OK", pid)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(code: str, tmp_path) -> list[tuple[int | None, str]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    try:
        for pid in range(2):
            log = open(tmp_path / f"worker{pid}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-c", code, str(pid)], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, cwd=REPO), log))
        deadline = time.monotonic() + TIMEOUT_S
        # a worker that dies leaves its peer blocked in a collective: stop waiting on the first failure
        while time.monotonic() < deadline:
            codes = [p.poll() for p, _ in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        return [(p.poll(), (tmp_path / f"worker{i}.log").read_text()) for i, (p, _) in enumerate(procs)]
    finally:
        for p, log in procs:  # only our own workers, by their Popen handle; no-op if they exited
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def test_two_process_group_round_equals_single_process_unsharded(tmp_path):
    code = WORKER.format(tests=os.path.dirname(__file__), port=_free_port(), chunks=CHUNKS, depth=DEPTH,
                         E=E, B=B, outdir=str(tmp_path))
    results = _launch(code, tmp_path)
    for pid, (rc, log) in enumerate(results):
        assert rc == 0 and f"WORKER_OK {pid}" in log, f"worker {pid} rc={rc} (None: still running at the timeout or after a peer failed, killed):\n{log[-4000:]}"

    model, params, trainable, data, sizes = setup()
    plain, metrics = make_group_round(model, OPT, depth=DEPTH, local_steps=E, batch_size=B, n_max=data.n_max)(
        trainable, base_of(params), data, jnp.arange(8, dtype=jnp.int32), jnp.asarray(sizes),
        jax.random.PRNGKey(3))
    leaves = jax.tree.leaves(plain)
    for pid in range(2):
        got = np.load(tmp_path / f"result{pid}.npz")
        for chunk in CHUNKS:
            for i, x in enumerate(leaves):
                np.testing.assert_allclose(got[f"{chunk}/agg{i}"], np.asarray(x), atol=1e-5, rtol=0,
                                           err_msg=f"process {pid}, chunk_size={chunk}, leaf {i}")
            np.testing.assert_allclose(got[f"{chunk}/loss"], np.asarray(metrics.loss), atol=1e-5, rtol=0)
    # the round did train: the aggregate moved away from the initial adapters
    assert np.abs(np.asarray(plain["lora"].weights["query"]["B"][2])).max() > 0
