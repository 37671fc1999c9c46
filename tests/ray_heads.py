"""Helpers for tests that need a Ray head of their own (`ray start`), beside the session's.

Each head gets its own temp dir; stopping it kills exactly the processes that
carry that dir on their command line (never `ray stop`, which would stop every
Ray on the machine, the test session's included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A driver that starts the HTTP API on a head (the app's builder starts the fleet),
# with the PERSONA_* settings of its environment; prints the port as JSON.
START_API = textwrap.dedent(
    """
    import json, ray
    from ray import serve
    from persona.settings import load_settings
    from serving.app import build_app
    settings = load_settings()
    ray.init(address="auto", namespace=settings.namespace, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": settings.http_port})
    serve.run(build_app(settings), name="persona", route_prefix="/")
    print(json.dumps({"port": settings.http_port}))
    """
)


class Head:
    def __init__(
        self,
        *,
        dashboard: bool = False,
        env: dict | None = None,
        extra: list[str] = (),
        port: int | None = None,
    ):
        self.temp_dir = f"/tmp/rt-{uuid.uuid4().hex[:6]}"
        self.port = port or free_port()
        self.dashboard_port = free_port() if dashboard else None
        # Test heads listen on loopback only and live for one test: no auth token to
        # hand around between the head and the drivers the test starts.
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            # Job entrypoints say `python`: make that the interpreter running the tests.
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--min-worker-port={free_port()}",
            "--max-worker-port=0",
        ]
        if dashboard:
            cmd += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}",
            ]
        else:
            cmd += ["--include-dashboard=false"]
        cmd += list(extra)
        try:
            subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=120)
        except BaseException:
            self.stop()  # whatever `ray start` got running before it failed
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def run_python(self, code: str, timeout: float = 300, env: dict | None = None) -> dict:
        """Run a driver against this head; its last stdout line is JSON."""
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={**self.env, "RAY_ADDRESS": self.address, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"driver failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
            )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(f"driver printed no JSON:\n{result.stdout[-3000:]}")
        return json.loads(lines[-1])

    def stop(self) -> None:
        # Ray's client server carries the head's address, not its temp dir.
        markers = (self.temp_dir.encode(), f":{self.port} ".encode(), f":{self.port}\0".encode())
        for _ in range(3):
            found = False
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                    if any(m in cmdline for m in markers) and b"ray" in cmdline:
                        os.kill(int(proc.name), signal.SIGKILL)
                        found = True
                except (OSError, ProcessLookupError):
                    continue
            if not found:
                break
            time.sleep(0.5)


# --- `persona up` stacks ----------------------------------------------------------

STACK_PORTS = (
    "PERSONA_HTTP_PORT",
    "PERSONA_GRPC_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    "PERSONA_RAY_PORT",
    "PERSONA_DASHBOARD_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
)


def stack_env(data_dir, **settings) -> dict:
    """The environment a test runs `persona` with: free ports for everything the
    stack listens on (the machine may run other stacks), its own data dir, the given
    PERSONA_* settings; never a RAY_ADDRESS of the session's."""
    env = {
        **os.environ,
        **{name: str(free_port()) for name in STACK_PORTS},
        "PERSONA_DATA_DIR": str(data_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
        **{name: str(value) for name, value in settings.items()},
    }
    env.pop("RAY_ADDRESS", None)
    return env


def persona(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `persona` command (the checkout's code) with ``env``."""
    from persona.settings import PROJECT_ROOT

    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
