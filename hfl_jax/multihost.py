"""Starting one run on several processes (hosts): the launch options, their checks, and a
rendezvous with a stated timeout before ``jax.distributed.initialize``.

``jax.distributed.initialize`` aborts the process (SIGABRT and a C++ stack trace) when the
coordinator cannot be reached or not every process joins within its timeout. So when the
coordinator address, the number of processes and this process's id are all known, every
process first meets process 0 over a plain TCP connection to the coordinator's port, with a
deadline: a bad start (no coordinator, too few processes, mismatched counts, a duplicate id)
then raises :class:`LaunchError` naming the option, in every process that took part. Process 0
then closes its socket and JAX's coordination service takes the port over.
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket
import time

DEFAULT_TIMEOUT_S = 300.0   # jax.distributed.initialize's own default
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID", "timeout": "HFL_COORDINATOR_TIMEOUT"}
OPTION = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id",
          "timeout": "--coordinator-timeout"}


class LaunchError(ValueError):
    """A multi-process start that cannot work; the message names the option."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where the coordinator is, how many processes there are and which one this is (None:
    JAX's cluster auto-detection fills it in: SLURM, Open MPI, TPU pods). ``source`` names,
    per field, the option or environment variable the value came from (for error messages)."""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    source: tuple = ()

    def name(self, field: str) -> str:
        return dict(self.source).get(field, OPTION[field])

    @property
    def explicit(self) -> bool:
        """All three given: the rendezvous checks the start before JAX does."""
        return None not in (self.coordinator, self.num_processes, self.process_id)


def from_options(coordinator, num_processes, process_id, timeout, environ) -> Launch:
    """A :class:`Launch` from command-line values (None: not given), else the environment
    variables of :data:`ENV`. Raises :class:`LaunchError` on a value that is not a number."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
             "timeout": timeout}
    values, source = {}, []
    for field, value in given.items():
        name = OPTION[field]
        if value is None and environ.get(ENV[field], "") != "":
            value, name = environ[ENV[field]], ENV[field]
            source.append((field, name))
        if value is not None and field != "coordinator":
            try:
                value = float(value) if field == "timeout" else int(value)
            except ValueError:
                raise LaunchError(f"{name}: {value!r} is not a number") from None
        values[field] = value
    if values["timeout"] is None:
        values["timeout"] = DEFAULT_TIMEOUT_S
    return Launch(**values, source=tuple(source))


def check(launch: Launch) -> None:
    """The checks that need no other process: counts, id range, address form, timeout."""
    n, pid = launch.num_processes, launch.process_id
    if not launch.timeout > 0:
        raise LaunchError(f"{launch.name('timeout')}: {launch.timeout:g} s must be positive")
    if n is not None and n < 1:
        raise LaunchError(f"{launch.name('num_processes')}: {n} must be at least 1")
    if pid is not None and pid < 0:
        raise LaunchError(f"{launch.name('process_id')}: {pid} must be 0 or more")
    if n is not None and pid is not None and pid >= n:
        raise LaunchError(f"{launch.name('process_id')}: {pid} is out of range for "
                          f"{launch.name('num_processes')} {n} (ids are 0..{n - 1})")
    if launch.coordinator is not None:
        _split(launch)


def _split(launch: Launch) -> tuple[str, int]:
    host, _, port = launch.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"{launch.name('coordinator')}: {launch.coordinator!r} is not HOST:PORT "
                          f"(e.g. 127.0.0.1:23456 or node001:23456)")
    return host.strip("[]"), int(port)


def _readline(conn: socket.socket, limit: int = 4096) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(limit)
        if not chunk or len(buf) > limit:
            raise ValueError("connection closed before a full line")
        buf += chunk
    return buf


def _listen(port: int) -> socket.socket:
    if socket.has_dualstack_ipv6():   # like JAX's default bind address [::]:port
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))


def _serve(launch: Launch, port: int, deadline: float) -> None:
    """Process 0: wait for ids 1..n-1, check they agree, answer each ``ok`` or the error."""
    n, coord, timeout = launch.num_processes, launch.name("coordinator"), launch.timeout
    try:
        srv = _listen(port)
    except OSError as e:
        raise LaunchError(f"{coord} {launch.coordinator}: process 0 cannot listen on port {port} ({e.strerror}); "
                          f"is another run, or a second process with {launch.name('process_id')} 0, using it?")
    conns, ids, error = [], set(), None
    with srv:
        srv.settimeout(0.2)
        while len(ids) < n - 1 and error is None and time.monotonic() < deadline:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(max(deadline - time.monotonic(), 1.0))
            try:
                hello = json.loads(_readline(conn))
                pid, num = int(hello["process_id"]), int(hello["num_processes"])
            except (OSError, ValueError, KeyError, TypeError):   # not one of ours: ignore it
                conn.close()
                continue
            conns.append(conn)
            if num != n:
                error = (f"{launch.name('num_processes')}: process {pid} was started with {num} processes, "
                         f"process 0 with {n}; give every process the same count")
            elif pid in ids or pid == 0:
                error = f"{launch.name('process_id')}: two processes were started with id {pid}"
            ids.add(pid)
        if error is None and len(ids) < n - 1:
            missing = sorted(set(range(1, n)) - ids)
            error = (f"{launch.name('num_processes')} {n}: only {len(ids) + 1} of {n} processes reached the "
                     f"coordinator {launch.coordinator} within {timeout:g} s ({launch.name('timeout')}); "
                     f"missing {launch.name('process_id')} {', '.join(map(str, missing))}")
        reply = (json.dumps({"error": error} if error else {"ok": True}) + "\n").encode()
        for conn in conns:
            with conn:
                try:
                    conn.sendall(reply)
                    conn.settimeout(5.0)
                    conn.recv(1)   # the peer closes first: no TIME_WAIT on the port JAX binds next
                except OSError:
                    pass
    if error:
        raise LaunchError(error)


def _join(launch: Launch, host: str, port: int, deadline: float) -> None:
    """Process 1..n-1: reach process 0 (retrying until the deadline), say who we are, await its answer."""
    coord, timeout = launch.name("coordinator"), launch.timeout
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise LaunchError(f"{coord} {launch.coordinator}: no coordinator answered within {timeout:g} s "
                                  f"({launch.name('timeout')}); is the process with {launch.name('process_id')} 0 "
                                  f"running on that host, and the port open?") from None
            time.sleep(0.25)
    with conn:
        hello = {"process_id": launch.process_id, "num_processes": launch.num_processes}
        try:
            conn.sendall((json.dumps(hello) + "\n").encode())
            conn.settimeout(max(deadline - time.monotonic(), 0.0) + 30.0)   # process 0 answers by its deadline
            reply = json.loads(_readline(conn))
        except (OSError, ValueError):
            raise LaunchError(f"{coord} {launch.coordinator}: the coordinator did not confirm the start within "
                              f"{timeout:g} s ({launch.name('timeout')}); is it an hfl-jax process 0?") from None
    if reply.get("error"):
        raise LaunchError(str(reply["error"]))


def rendezvous(launch: Launch) -> None:
    """Meets every process of an :attr:`Launch.explicit` launch within ``launch.timeout`` seconds,
    or raises :class:`LaunchError` (in every process that got an answer) naming the option."""
    check(launch)
    host, port = _split(launch)
    deadline = time.monotonic() + launch.timeout
    if launch.process_id == 0:
        _serve(launch, port, deadline)
    else:
        _join(launch, host, port, deadline)


def initialize(launch: Launch) -> None:
    """``jax.distributed.initialize`` for ``launch``, after :func:`rendezvous` when every value is
    given; with values missing, JAX's cluster auto-detection must supply them (else
    :class:`LaunchError` naming the missing option). One process (``num_processes=1``) is a no-op."""
    import jax

    check(launch)
    if launch.num_processes == 1:
        return
    start = time.monotonic()
    if launch.explicit:
        rendezvous(launch)
    left = math.ceil(max(launch.timeout - (time.monotonic() - start), 10.0))
    try:
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   initialization_timeout=left)
    except ValueError as e:   # auto-detection found no cluster manager to fill the missing values
        missing = [launch.name(f) for f in ("coordinator", "num_processes", "process_id")
                   if getattr(launch, f) is None]
        raise LaunchError(f"{', '.join(missing) or 'multi-host start'}: not given, and no cluster manager "
                          f"(SLURM, Open MPI, TPU pod) was detected to supply it ({e}); give --coordinator "
                          f"HOST:PORT, --num-processes N and --process-id I on every process") from None
