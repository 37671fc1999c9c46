"""`persona up|down|status`: a local Ray head with the shards and the Serve app, and its teardown.

`up` starts the Ray head in a process session of its own and records that
session (with the stack's settings) in <data_dir>/up.json. Every process the head
starts, Ray's agents, its client server, Serve's proxies and HAProxy included,
stays in that session, so `down` stops exactly those: it asks Serve and the
shards to stop, then ends every process of the session and checks none is left.
A failed `up` undoes what it did before it reports why. Commands run later
(`scale`, `status`, `ingest`, `checkpoint`, `export`) act on the recorded stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from persona.errors import PersonaError
from persona.settings import Settings

HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# The ports Serve's HAProxy binds besides the API (metrics, stats): Ray's defaults.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_METRICS_PORT": 9101, "RAY_SERVE_HAPROXY_STATS_PORT": 8404}
# With HAProxy and gRPC on, Serve's gRPC proxy moves to this port (Ray's default).
FALLBACK_GRPC_PORT = ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", 9500)
APP_NAME = "persona"
HEAD_START_S = 120.0
STOP_GRACE_S = 10.0


def state_file(settings: Settings) -> Path:
    return Path(settings.data_dir) / "up.json"


def read_stack(settings: Settings) -> dict | None:
    """The stack `persona up` recorded in this data dir, if any."""
    path = state_file(settings)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stack_settings(record: dict, token: str = "") -> Settings:
    """The settings a recorded stack runs with (its token is never recorded)."""
    return Settings(**{**record["settings"], "api_token": token})


# --- processes of a session ------------------------------------------------------------
def session_members(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (the head's launcher and all it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def stop_session(sid: int, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every process of the session, then SIGKILL what is left after a grace
    period; returns how many there were. Never `ray stop`: that stops every Ray on
    the machine."""
    found = session_members(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(sid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return len(found)


def port_holder(port: int) -> str | None:
    """Who listens on a local TCP port: "pid N (command)", "another process", or None."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return None
        except OSError:
            pass
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
                    inodes.add(cols[9])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    return f"pid {entry.name} ({cmd.strip()[:100]})"
    return "another process"


def ray_temp_dir(settings: Settings) -> str:
    """The stack's Ray temp dir (short: Ray puts unix sockets under it)."""
    return f"/tmp/persona-ray-{settings.ray_port}"


def local_resources() -> dict[str, float]:
    """What a single-machine Ray offers: room for plenty of shards."""
    return {"persona_shard": 64}


def _unused_port() -> int:
    """A port nothing listens on now, for the head's internal endpoints."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- up / down / status -------------------------------------------------------------
def up(settings: Settings, *, haproxy: bool = True) -> dict:
    """Start a Ray head, the shards, the HTTP API and (unless PERSONA_GRPC_PORT=0) the
    gRPC reads; undo everything on failure."""
    record = read_stack(settings)
    if record is not None:
        if session_members(record["sid"]):
            raise PersonaError(
                f"Persona is already up (API {record['api']}, Ray session {record['sid']}); "
                "`persona down` stops it"
            )
        state_file(settings).unlink(missing_ok=True)  # a stack that died: nothing runs
    ports = {
        "the Ray head": settings.ray_port,
        "the dashboard": settings.dashboard_port,
        "the HTTP API": settings.http_port,
    }
    if settings.grpc_port:
        ports["the gRPC API"] = settings.grpc_port
    if haproxy:
        ports.update({f"HAProxy ({name})": port for name, port in _haproxy_ports().items()})
        if settings.grpc_port:
            # Behind HAProxy, Serve's own gRPC proxy still listens (for what HAProxy
            # cannot answer itself) on a port of its own.
            ports[f"Serve's gRPC fallback ({FALLBACK_GRPC_PORT[0]})"] = _fallback_grpc_port()
    taken = [
        f"{what} needs port {p}, held by {h}" for what, p in ports.items() if (h := port_holder(p))
    ]
    if taken:
        raise PersonaError(
            "cannot start: " + "; ".join(taken) + ". If that is an earlier Persona, "
            "`persona down` stops it; otherwise stop that process or choose other ports "
            "(PERSONA_HTTP_PORT, PERSONA_GRPC_PORT, PERSONA_RAY_PORT, PERSONA_DASHBOARD_PORT)"
        )
    log_path = Path(settings.data_dir) / "ray-head.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    launcher = _start_head(settings, haproxy, log_path)
    record = {
        "sid": launcher.pid,
        "ray_address": f"127.0.0.1:{settings.ray_port}",
        "api": f"http://127.0.0.1:{settings.http_port}",
        "grpc": f"127.0.0.1:{settings.grpc_port}" if settings.grpc_port else None,
        "dashboard": f"http://127.0.0.1:{settings.dashboard_port}",
        "settings": dataclasses.asdict(dataclasses.replace(settings, api_token="")),
    }
    state_file(settings).write_text(json.dumps(record))
    try:
        _wait_for_head(launcher, settings, log_path)
        record["shards"] = _start_app(settings, record["ray_address"])
        _wait_for_api(record["api"])
    except BaseException as exc:
        stop_session(launcher.pid)
        state_file(settings).unlink(missing_ok=True)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise PersonaError(
            f"persona up failed, and what it started is stopped again: {exc} "
            f"(Ray's log: {log_path})"
        ) from exc
    state_file(settings).write_text(json.dumps(record))
    return record


def _haproxy_ports() -> dict[str, int]:
    return {name: int(os.environ.get(name, default)) for name, default in HAPROXY_PORTS.items()}


def _fallback_grpc_port() -> int:
    name, default = FALLBACK_GRPC_PORT
    return int(os.environ.get(name, default))


def _start_head(settings: Settings, haproxy: bool, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray 2.60 authenticates every client of the clusters it starts with the token
        # in ~/.ray/auth_token; drivers of the stack join with it (see connect).
        "RAY_AUTH_MODE": "token",
        # Job entrypoints say `python`: make that this installation's interpreter.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        # A submitted job runs in a copy of its working dir, whose own default data dir
        # holds no stack record: this one does, so the job acts with the stack's settings.
        "PERSONA_DATA_DIR": str(Path(settings.data_dir).resolve()),
        **(HAPROXY_ENV if haproxy else {}),
    }
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",  # the launcher stays, so its session holds every process of the head
        f"--port={settings.ray_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={settings.dashboard_port}",
        # A temp dir of its own: Ray's job supervisor finds the cluster a submitted job
        # joins through <temp dir>/ray_current_cluster, which in the shared /tmp/ray
        # names whichever head started last on the machine, not necessarily this one.
        f"--temp-dir={ray_temp_dir(settings)}",
        # Ray's defaults for these (52365, 10001) are fixed: a second head on the machine
        # (another stack, a test cluster) would leave this one without a job agent.
        f"--dashboard-agent-listen-port={_unused_port()}",
        f"--ray-client-server-port={_unused_port()}",
        "--disable-usage-stats",
        f"--resources={json.dumps(local_resources())}",
    ]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_head(launcher: subprocess.Popen, settings: Settings, log_path: Path) -> None:
    deadline = time.monotonic() + HEAD_START_S
    while not _listening(settings.ray_port):
        if launcher.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise PersonaError(f"the Ray head exited ({launcher.returncode}): {tail}")
        if time.monotonic() > deadline:
            raise PersonaError(f"the Ray head did not listen on {settings.ray_port} in time")
        time.sleep(0.5)


def connect(address: str, namespace: str) -> None:
    """Join the stack's Ray head as a driver (with Ray's token: see jobs.cli)."""
    import ray

    ray.init(address=address, namespace=namespace, logging_level="warning")


def _start_app(settings: Settings, address: str) -> list[str]:
    import ray
    from ray import serve

    from actors.fleet import Fleet
    from serving.app import build_app
    from serving.grpc_ingress import grpc_options

    connect(address, settings.namespace)
    try:
        fleet = Fleet.start(settings)
        serve.start(
            http_options={"host": "127.0.0.1", "port": settings.http_port},
            grpc_options=grpc_options(settings),
        )
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        return sorted(fleet.shards)
    finally:
        ray.shutdown()


def _wait_for_api(api: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{api}/healthz", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PersonaError(f"the API at {api} did not answer in time")
        time.sleep(0.5)


def down(settings: Settings) -> list[str]:
    """Stop the recorded stack: Serve and the shards first (state stays in the
    store), then every process of the head's session."""
    record = read_stack(settings)
    if record is None:
        return [f"nothing was running (no stack recorded in {state_file(settings)})"]
    done = []
    if session_members(record["sid"]) and _listening(int(record["ray_address"].split(":")[1])):
        import ray
        from ray import serve

        from actors.fleet import Fleet

        try:
            connect(record["ray_address"], record["settings"]["namespace"])
            with contextlib.suppress(Exception):
                serve.shutdown()
                done.append("Serve stopped")
            with contextlib.suppress(Exception):
                Fleet.connect(stack_settings(record)).shutdown()
                done.append("shards stopped (their state is in the store)")
        finally:
            ray.shutdown()
    stopped = stop_session(record["sid"])
    left = session_members(record["sid"])
    if left:
        raise PersonaError(f"processes {left} of the Ray session would not stop")
    state_file(settings).unlink(missing_ok=True)
    done.append(f"Ray head stopped ({stopped} processes)")
    return done


def status(settings: Settings) -> dict:
    """What is running, and what is left over from a stack that died."""
    record = read_stack(settings)
    if record is None:
        return {"stack": "not running"}
    members = session_members(record["sid"])
    report: dict = {
        "stack": "running" if members else "stopped",
        "api": record["api"],
        "grpc": record.get("grpc"),
        "dashboard": record["dashboard"],
        "store": stack_settings(record).resolved_store_url(),
        "processes": len(members),
    }
    if not members:
        report["note"] = "the recorded stack is gone; `persona down` clears the record"
        return report
    if not _listening(int(record["ray_address"].split(":")[1])):
        report["stack"] = "broken"
        report["note"] = f"{len(members)} processes left over; `persona down` stops them"
        return report
    import ray

    from actors.fleet import Fleet

    connect(record["ray_address"], record["settings"]["namespace"])
    try:
        with Fleet.connect(stack_settings(record)) as fleet:  # closes its store session
            report["shards"] = fleet.stats()
    except Exception as exc:  # a report, not a crash: say what failed
        report["shards"] = f"not answering ({type(exc).__name__}: {exc})"
    finally:
        ray.shutdown()
    try:
        with urllib.request.urlopen(f"{record['api']}/readyz", timeout=5) as reply:
            report["api_ready"] = json.loads(reply.read())
    except Exception as exc:
        report["api_ready"] = f"not answering ({exc})"
    return report
