"""The command line on two processes (jax.distributed on localhost, gloo CPU collectives):
the README's example run == the same run in one process with two devices, bit for bit (wall
times aside), also after SIGKILLing both processes mid-run and resuming on both; and a bad
multi-host start exits 2 with one line naming the option.

The commands are read from README.md ("Runs on several hosts"), so the README shows what runs here.
"""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 400
MARKER = "<!-- tests/test_multihost_cli.py runs these commands"
README_PORT = "127.0.0.1:23456"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_commands() -> list[tuple[dict, list[str]]]:
    """``(env, argv after hfl-jax)`` of each command in the README's tested block, in order."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(MARKER):].split("```")[1]
    out = []
    for line in block.splitlines()[1:]:
        line = line.strip().rstrip("&").strip()
        if not line or line.startswith("#") or line == "wait":
            continue
        words = shlex.split(line)
        env = {}
        while "=" in words[0]:
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        assert words[0] == "hfl-jax", line
        out.append((env, words[1:]))
    return out


def _localize(argv: list[str], runs: Path, port: int) -> list[str]:
    """The README's argv with its port replaced by a free one and ``runs/`` by ``runs``."""
    return [a.replace(README_PORT, f"127.0.0.1:{port}") if a == README_PORT
            else str(runs / a[len("runs/"):]) if a.startswith("runs/") else a for a in argv]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                                "OMPI_", "HFL_DISTRIBUTED", "HFL_FAULT"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]))
    env.pop("XLA_FLAGS", None)
    env.update(extra or {})
    return env


def _launch(commands: list[list[str]], log_dir: Path, env: dict | None = None, wait_all: bool = False,
            timeout: float = TIMEOUT_S) -> list[tuple[int | None, str]]:
    """Starts ``hfl-jax`` with each argv at once; ``(returncode, output)`` of each. Unless
    ``wait_all``, stops waiting (and kills the rest) once one fails: its peers would block in a
    collective until JAX's heartbeat gives up."""
    procs = []
    try:
        for i, argv in enumerate(commands):
            log = open(log_dir / f"proc{i}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "hfl_jax", *argv], cwd=ROOT, env=_env(env),
                                           stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p, _ in procs]
            if all(c is not None for c in codes) or (not wait_all and any(c not in (None, 0) for c in codes)):
                break
            time.sleep(0.2)
        return [(p.poll(), (log_dir / f"proc{i}.log").read_text()) for i, (p, _) in enumerate(procs)]
    finally:
        for p, log in procs:   # only our own processes, by their Popen handle
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def _records(run: Path) -> list:
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_time"}
    return [strip(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final_adapters(run: Path):
    """``(step, trainable)`` of the newest checkpoint, restored onto this process's one device
    (whatever process layout wrote it)."""
    import jax
    import orbax.checkpoint as ocp

    ckpts = run.absolute() / "checkpoints"
    step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    path = ckpts / str(step) / "trainable"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(path).item_metadata
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        return step, c.restore(path, abstract)


def _assert_same_run(reference: Path, run: Path) -> None:
    import jax

    assert _records(run) == _records(reference)
    (s1, a), (s2, b) = _final_adapters(reference), _final_adapters(run)
    assert s1 == s2 == len(_records(reference))
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert len(la) == len(lb) > 0
    for (pa, xa), (pb, xb) in zip(la, lb):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb), err_msg=str(pa))


def _two(kind: str) -> list[list[str]]:
    cmds = [argv for _, argv in readme_commands() if argv[0] == kind and "--process-id" in argv]
    assert [argv[argv.index("--process-id") + 1] for argv in cmds] == ["0", "1"], cmds
    return cmds


def _ok(results, code=0):
    for i, (rc, log) in enumerate(results):
        assert rc == code, f"process {i}: rc={rc} (None: killed at the timeout or after a peer failed):\n{log[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory):
    """The README's one-process, two-device run."""
    (env, argv), = [(e, a) for e, a in readme_commands() if "XLA_FLAGS" in e]
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    _ok(_launch([_localize(argv, runs, 0)], tmp_path_factory.mktemp("one"), env=env))
    return runs / "smoke-1p"


def test_readme_example_two_processes_equal_one_process_with_two_devices(one_process, runs, tmp_path):
    port = _free_port()
    results = _launch([_localize(a, runs, port) for a in _two("run")], tmp_path)
    _ok(results)
    assert "done: final accuracy" in results[0][1] and "done: final accuracy" not in results[1][1]
    _assert_same_run(one_process, runs / "smoke-2p")


def test_two_processes_killed_mid_run_resume_on_both_bit_identically(one_process, tmp_path):
    runs = tmp_path / "runs"
    port = _free_port()
    killed = _launch([_localize(a, runs, port) for a in _two("run")], tmp_path, wait_all=True,
                     env={"HFL_FAULT_KILL_ROUND": "2"})   # SIGKILL after round 2's metrics line, before its checkpoint
    _ok(killed, code=-9)
    assert len(_records(runs / "smoke-2p")) == 2
    port = _free_port()
    resumed = _launch([_localize(a, runs, port) for a in _two("resume")], tmp_path)
    _ok(resumed)
    assert "resuming" in resumed[0][1] and "from checkpoint 1" in resumed[0][1]
    _assert_same_run(one_process, runs / "smoke-2p")


def _one_line(log: str) -> str:
    lines = [l for l in log.strip().splitlines() if l.strip() and not l.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("hfl-jax: error: "), log
    return lines[0]


def _run_argv(out: Path, *launch: str) -> list[str]:
    return ["run", "experiments/configs/smoke.yaml", "--out", str(out), "--quiet", *launch]


BAD_STARTS = [
    (("--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"), {},
     "--process-id: 2 is out of range"),
    ((), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"},
     "JAX_PROCESS_ID"),
    (("--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"), {},
     "--coordinator: 'localhost' is not HOST:PORT"),
    (("--num-processes", "0"), {}, "--num-processes: 0 must be at least 1"),
    ((), {"HFL_DISTRIBUTED": "1", "HFL_COORDINATOR_TIMEOUT": "5"},   # no cluster manager to auto-detect
     "--coordinator, --num-processes, --process-id: not given"),
]


@pytest.mark.parametrize("launch, env, named", BAD_STARTS)
def test_bad_start_is_one_line_exit_2_naming_the_option(tmp_path, launch, env, named):
    (rc, log), = _launch([_run_argv(tmp_path / "never", *launch)], tmp_path, env=env, timeout=120)
    assert rc == 2, log
    assert named in _one_line(log)
    assert not (tmp_path / "never").exists()


def test_no_coordinator_exits_2_after_the_stated_timeout(tmp_path):
    coord = f"127.0.0.1:{_free_port()}"   # nothing listens there
    (rc, log), = _launch([_run_argv(tmp_path / "never", "--coordinator", coord, "--num-processes", "2",
                                    "--process-id", "1", "--coordinator-timeout", "2")], tmp_path, timeout=120)
    assert rc == 2, log
    line = _one_line(log)
    assert f"--coordinator {coord}: no coordinator answered within 2 s" in line


@pytest.mark.parametrize("counts, named", [
    ((3, 3), r"--num-processes 3: only 2 of 3 processes reached the coordinator .* within 3 s"),
    ((2, 3), r"--num-processes: process 1 was started with 3 processes, process 0 with 2"),
])
def test_wrong_process_count_exits_2_on_every_process(tmp_path, counts, named):
    coord = f"127.0.0.1:{_free_port()}"
    cmds = [_run_argv(tmp_path / "never", "--coordinator", coord, "--num-processes", str(n), "--process-id", str(i),
                      "--coordinator-timeout", "3") for i, n in enumerate(counts)]
    results = _launch(cmds, tmp_path, wait_all=True, timeout=120)
    for rc, log in results:
        assert rc == 2, log
        assert re.search(named, _one_line(log)), log
    assert not (tmp_path / "never").exists()
