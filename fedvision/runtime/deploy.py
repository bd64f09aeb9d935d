"""Real federations over gRPC: ``fedvision server`` (a SuperLink) and ``fedvision client``.

Flower 1.39 does the transport: ``flower-superlink`` (Fleet API over gRPC for SuperNodes, an HTTP
Control API for ``flwr run``) and ``flower-supernode``. This module builds their command lines
from a few options, starts them as child processes in their own process group (so that their
SuperExec and app children stop with them), waits until they are up, turns their known failures
into one-line errors, and stops everything on Ctrl-C / SIGTERM.

A fedvision client is a SuperNode in ``--isolation process`` mode (``fedvision.runtime.supernode``,
which also shortens Flower's fixed polling) plus a warm task executor in this process
(``fedvision.runtime.client_worker``) that runs the ClientApp without a new Python per message.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.runtime.simulation import OFFLINE_ENV

FLEET_PORT = 9092  # Flower's Fleet API (SuperNodes connect here)
CONTROL_PORT = 8000  # Flower's Control API (`flwr run`, `flwr supernode register`)
CLIENT_PORT = 9094  # a SuperNode's local Runtime API; one per SuperNode on a host
# How often a waiting SuperNode and the server's round loop ask for news. Flower's fixed 3 s
# is most of a round's overhead on loopback (scripts/bench_deploy.py); 0.1 s costs a few small
# requests per second per client.
POLL_S = 0.1
# Known failures in a SuperNode's log, and what to tell the user.
CLIENT_FAILURES = (
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|Handshake failed", re.I),
        "the server's TLS certificate is not signed by the CA given with --root-certificates "
        "(or its names do not include the address used): use the ca.pem of `fedvision certs` "
        "that made the server's certificate, and a --server name the certificate lists",
    ),
    (
        re.compile(
            r"Failed to activate SuperNode|No SuperNode found with the given public key|"
            r"PERMISSION_DENIED|UNAUTHENTICATED",
            re.I,
        ),
        "the server refused this node's key: register its public key on the server "
        "(fedvision server --register KEY.pub, or flwr supernode register KEY.pub) "
        "or start the client with the private key that was registered",
    ),
)


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a Flower child: offline, this venv's tools on PATH."""
    env = {**os.environ, **OFFLINE_ENV, **(extra or {})}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # The SuperLink's SuperExec starts the ServerApp after polling for it (1 s by default).
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(POLL_S))
    return env


@dataclass
class Child:
    """A started Flower process (a group leader: its SuperExec and apps share its group)."""

    name: str
    proc: subprocess.Popen
    log: Path
    node_ids: dict[Path, int | None] = field(default_factory=dict)  # registered key -> node id

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole group (or the process), then SIGKILL after ``timeout_s``."""
        try:
            leader = os.getpgid(self.proc.pid) == self.proc.pid
        except ProcessLookupError:  # gone already
            self.proc.poll()
            return
        if leader:
            stop_group(self.proc, timeout_s)
        else:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1.0)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the process's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_group(leader: subprocess.Popen | int, timeout_s: float = 10.0) -> None:
    """Stop a process group: SIGTERM, wait up to ``timeout_s``, then SIGKILL.

    ``leader``: the group leader's Popen (it keeps the leader's exit status) or its pid.
    """
    pgid = leader.pid if isinstance(leader, subprocess.Popen) else int(leader)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            _reap(leader, pgid)
            time.sleep(0.1)


def _reap(leader: subprocess.Popen | int, pgid: int) -> None:
    # Zombie children keep their group alive for killpg(…, 0); collect the group's own. Through
    # the Popen where there is one: a status taken behind its back reads as exit 0 there, and
    # other children (not of this group) keep theirs.
    if isinstance(leader, subprocess.Popen):
        leader.poll()
        return
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the process that started it dies, even by SIGKILL, so
    # a killed `fedvision client` never leaves a SuperNode that answers heartbeats but no tasks.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_child(
    name: str,
    cmd: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    own_group: bool = True,
) -> Child:
    """Start ``cmd``, its output appended to ``log``; it dies with this process.

    ``own_group``: a new process group (its children stop with it; Ctrl-C in the terminal
    reaches only this process, which stops it). Else it shares this process's group, so that
    whoever stops the group stops it too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else flower_env(),
            start_new_session=own_group,
            preexec_fn=_die_with_parent,
        )
    return Child(name, proc, log)


def wait_for_port(host: str, port: int, child: Child, timeout_s: float = 60.0) -> None:
    """Wait until ``host:port`` accepts TCP connections, or fail if ``child`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise FedvisionError(
                f"{child.name} exited with code {child.proc.returncode} while starting; "
                f"last log line: {_last_line(child)} (log: {child.log})"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.1)
    raise FedvisionError(f"{child.name} did not open {host}:{port} within {timeout_s:g} s")


def _last_line(child: Child) -> str:
    lines = [ln for ln in child.log_tail(60).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(empty)"


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """``HOST[:PORT]`` (IPv6 in brackets) as (host, port)."""
    match = re.fullmatch(
        r"\[(?P<h6>[^\]]+)\](:(?P<p6>\d+))?|(?P<h>[^:\[\]]+)(:(?P<p>\d+))?", address.strip()
    )
    if match is None:
        raise FedvisionError(f"{address!r} is no HOST[:PORT] address (IPv6 as [ADDR]:PORT)")
    host = match.group("h6") or match.group("h")
    port = match.group("p6") or match.group("p")
    return host, int(port) if port else default_port


def _tls_files(certs: Path | None, insecure: bool, *, server: bool) -> dict[str, Path]:
    if insecure:
        return {}
    if certs is None:
        raise FedvisionError(
            "TLS needs certificates: pass --certs DIR (made by `fedvision certs`), or --insecure "
            "for an unencrypted federation on a trusted network"
        )
    certs = Path(certs)
    if server:
        files = {"ca": certs / "ca.pem", "cert": certs / "server.pem", "key": certs / "server.key"}
    else:  # a client names the CA file itself, or the folder holding it
        files = {"ca": certs if certs.is_file() else certs / "ca.pem"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FedvisionError(
            f"missing TLS file(s) {', '.join(missing)}: make them with `fedvision certs --out "
            f"{certs}` on one machine and copy them as docs/tutorials/grpc-federation.md says"
        )
    return files


@dataclass
class ServerOptions:
    """What ``fedvision server`` starts: a SuperLink with TLS, node authentication and state.

    Node authentication comes with TLS: only SuperNodes whose public key was registered
    (``register``, or ``flwr supernode register``; the database keeps them) can join. With
    ``insecure`` both are off: any machine that reaches the Fleet API can join.
    """

    certs: Path | None = None
    insecure: bool = False
    database: Path | None = None
    fleet: str = f"0.0.0.0:{FLEET_PORT}"
    host: str = "127.0.0.1"  # the Control API: 0.0.0.0 lets other machines submit runs
    port: int = CONTROL_PORT
    register: list[Path] = field(default_factory=list)
    log: Path = Path("superlink.log")
    flwr_home: Path | None = None

    @property
    def auth(self) -> bool:
        """Whether only registered node keys may join: always with TLS, never without."""
        return not self.insecure

    def check(self) -> None:
        """Refuse settings that cannot start (before anything starts)."""
        if self.register and self.insecure:
            raise FedvisionError(
                "--register needs node authentication, which comes with TLS: drop --insecure "
                "and pass --certs"
            )
        for key in self.register:
            if not Path(key).is_file():
                raise FedvisionError(f"--register {key}: no such public key file")
        _tls_files(self.certs, self.insecure, server=True)
        split_address(self.fleet, FLEET_PORT)

    def command(self) -> list[str]:
        """The ``flower-superlink`` command line."""
        cmd = ["flower-superlink", "--disable-runtime-dependency-installation"]
        tls = _tls_files(self.certs, self.insecure, server=True)
        if tls:
            cmd += [
                "--ssl-ca-certfile",
                str(tls["ca"]),
                "--ssl-certfile",
                str(tls["cert"]),
                "--ssl-keyfile",
                str(tls["key"]),
            ]
        else:
            cmd.append("--insecure")
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        cmd += ["--fleet-api-address", self.fleet, "--host", self.host, "--port", str(self.port)]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def control_address(self) -> str:
        """Where ``flwr`` on this machine reaches the Control API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{host}:{self.port}"


def write_flwr_config(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = "fedvision"
) -> None:
    """A ``$FLWR_HOME/config.toml`` whose connection ``name`` reaches the Control API."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def register_keys(flwr_home: Path, keys: Sequence[Path]) -> dict[Path, int | None]:
    """Register SuperNode public keys with the running SuperLink (``flwr supernode register``).

    Returns each key's node id (the id the server's ``nodes.jsonl`` names), or None for a key
    the database held already.
    """
    env = flower_env({"FLWR_HOME": str(flwr_home)})
    ids: dict[Path, int | None] = {}
    for key in keys:
        done = subprocess.run(
            ["flwr", "supernode", "register", str(Path(key).resolve()), "fedvision"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = (done.stdout + done.stderr).strip()
        if done.returncode != 0 and "already" not in text.lower():
            last = text.splitlines()[-1] if text else f"exit code {done.returncode}"
            raise FedvisionError(f"registering {key} failed: {last}")
        found = re.search(r"SuperNode (\d+) registered", text)
        ids[Path(key)] = int(found.group(1)) if found else None
    return ids


def start_server(opts: ServerOptions) -> Child:
    """Start the SuperLink, wait for its APIs, register node keys; return the running child."""
    opts.check()
    child = start_child("SuperLink", opts.command(), opts.log)
    try:
        fleet_host, fleet_port = split_address(opts.fleet, FLEET_PORT)
        wait_for_port(
            "127.0.0.1" if fleet_host in ("0.0.0.0", "::") else fleet_host, fleet_port, child
        )
        ctl_host, ctl_port = split_address(opts.control_address(), CONTROL_PORT)
        wait_for_port(ctl_host, ctl_port, child)
        if opts.register:
            home = opts.flwr_home or opts.log.parent / "flwr-home"
            tls = _tls_files(opts.certs, opts.insecure, server=True)
            write_flwr_config(home, opts.control_address(), tls.get("ca"))
            child.node_ids = register_keys(home, opts.register)
    except BaseException:
        child.stop()
        raise
    return child


@dataclass
class ClientOptions:
    """What ``fedvision client`` starts: a SuperNode for one partition, and its task worker."""

    server: str
    partition_id: int
    certs: Path | None = None  # the CA file, or the folder holding ca.pem
    insecure: bool = False
    auth_key: Path | None = None
    port: int = CLIENT_PORT
    node_config: dict[str, str | int] = field(default_factory=dict)
    heartbeat_s: float = 10.0
    max_wait_s: float | None = None
    log: Path = Path("supernode.log")

    def check(self) -> None:
        """Refuse settings that cannot start (before anything starts)."""
        if self.partition_id < 0:
            raise FedvisionError(f"--partition-id {self.partition_id} must be >= 0")
        if not 10 <= self.heartbeat_s <= 1800:
            raise FedvisionError(f"--heartbeat {self.heartbeat_s:g} s: Flower accepts 10 to 1800")
        _tls_files(self.certs, self.insecure, server=False)
        if self.auth_key is not None:
            if self.insecure:
                raise FedvisionError("--auth-key needs TLS: drop --insecure")
            if not Path(self.auth_key).is_file():
                raise FedvisionError(f"--auth-key {self.auth_key}: no such private key file")
        elif not self.insecure:
            raise FedvisionError(
                "a client over TLS needs --auth-key: the private key whose .pub the server "
                "registered (`fedvision certs --node-keys N` makes node-keys/node-i), or "
                "--insecure on a server started with --insecure"
            )
        split_address(self.server, FLEET_PORT)

    def command(self) -> list[str]:
        """The SuperNode command line (Flower's entry point behind fedvision's timings)."""
        host, port = split_address(self.server, FLEET_PORT)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        cmd = [
            sys.executable,
            "-m",
            "fedvision.runtime.supernode",
            "--poll-interval",
            str(POLL_S),
            "--heartbeat-interval",
            str(self.heartbeat_s),
            "--superlink",
            address,
            "--isolation",
            "process",
            "--port",
            str(self.port),
        ]
        tls = _tls_files(self.certs, self.insecure, server=False)
        cmd += ["--root-certificates", str(tls["ca"])] if tls else ["--insecure"]
        if self.auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.max_wait_s is not None:
            cmd += ["--max-wait-time", str(self.max_wait_s)]
        config = {C.KEY_PARTITION_ID: self.partition_id, **self.node_config}
        cmd += ["--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())]
        return cmd


def _toml_value(value: str | int | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def diagnose(child: Child) -> str | None:
    """A one-line explanation of a SuperNode failure found in its log, if it is a known one."""
    text = child.log_tail(200)
    for pattern, advice in CLIENT_FAILURES:
        if pattern.search(text):
            return advice
    return None


def run_client(opts: ClientOptions, stop: threading.Event) -> int:
    """Run a SuperNode and its task worker until ``stop`` is set or the SuperNode exits.

    Returns the number of tasks (messages) this client ran. Raises FedvisionError with the
    reason when the SuperNode fails (wrong CA, key not registered, server never reachable).
    """
    from fedvision.runtime.client_worker import serve_tasks

    opts.check()
    # In this process's group: stopping (or killing) the client's group stops its SuperNode.
    child = start_child("SuperNode", opts.command(), opts.log, own_group=False)
    done: list[int] = []
    worker = threading.Thread(
        target=lambda: done.append(serve_tasks(f"127.0.0.1:{opts.port}", stop)),
        name="fedvision-task-worker",
        daemon=True,
    )
    worker.start()
    advice = None
    try:
        while not stop.is_set() and child.alive():
            # Known failures leave a SuperNode retrying forever; say why and stop instead.
            advice = diagnose(child)
            if advice is not None:
                break
            stop.wait(0.5)
        died = not child.alive()  # on its own, not stopped by us
        if died:
            advice = diagnose(child)
    finally:
        stop.set()
        child.stop()
        worker.join(timeout=30)
    if advice is not None:
        raise FedvisionError(f"client {opts.partition_id}: {advice} (log: {opts.log})")
    if died:
        raise FedvisionError(
            f"client {opts.partition_id}: the SuperNode exited with code "
            f"{child.proc.returncode}: {_last_line(child)} (log: {opts.log})"
        )
    return done[0] if done else 0
