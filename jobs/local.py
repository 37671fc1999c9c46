"""`persona up|down|status`: a local Ray head with the shards and the Serve app, and its teardown.

`up` records what it started in <data_dir>/up.json; `down` stops exactly that:
the Serve app, the shard actors (state stays in the store) and, if `up` started
it, the Ray head.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from persona.settings import Settings

HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
APP_NAME = "persona"


def _state_file(settings: Settings) -> Path:
    return Path(settings.data_dir) / "up.json"


def _cluster_running() -> bool:
    from jobs.common import _local_cluster_running

    return _local_cluster_running()


def up(settings: Settings, *, haproxy: bool = True) -> dict:
    import ray
    from ray import serve

    from actors.fleet import Fleet
    from jobs.common import local_resources
    from serving.app import build_app

    started_ray = False
    if not _cluster_running():
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Job entrypoints say `python`: make that this installation's interpreter.
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            **(HAPROXY_ENV if haproxy else {}),
        }
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--dashboard-host=127.0.0.1",
                "--disable-usage-stats",
                f"--resources={json.dumps(local_resources())}",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        started_ray = True
    ray.init(address="auto", namespace=settings.namespace, logging_level="warning")
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    fleet = Fleet.start(settings)
    serve.start(http_options={"host": "127.0.0.1", "port": settings.http_port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    state = {
        "ray_started": started_ray,
        # Every process of the head we started carries this path on its command line.
        "session_dir": session_dir if started_ray else None,
        "namespace": settings.namespace,
        "shards": sorted(fleet.shards),
        "api": f"http://127.0.0.1:{settings.http_port}",
    }
    _state_file(settings).parent.mkdir(parents=True, exist_ok=True)
    _state_file(settings).write_text(json.dumps(state))
    return state


def down(settings: Settings) -> list[str]:
    import ray
    from ray import serve

    from actors.fleet import Fleet

    path = _state_file(settings)
    state = json.loads(path.read_text()) if path.exists() else {"ray_started": False}
    done = []
    if _cluster_running():
        ray.init(address="auto", namespace=settings.namespace, logging_level="warning")
        try:
            serve.delete(APP_NAME)
            done.append("Serve app deleted")
        except Exception as exc:  # not deployed: nothing to stop
            done.append(f"no Serve app ({type(exc).__name__})")
        try:
            Fleet.connect(settings).shutdown()
            done.append("shards stopped (their state is in the store)")
        except Exception as exc:
            done.append(f"no shards ({type(exc).__name__})")
        ray.shutdown()
        if state.get("ray_started") and state.get("session_dir"):
            stopped = _stop_session(state["session_dir"])
            done.append(f"Ray head stopped ({stopped} processes)")
    path.unlink(missing_ok=True)
    return done or ["nothing was running"]


def _stop_session(session_dir: str, grace_s: float = 10.0) -> int:
    """Stop exactly the processes of one Ray session (not `ray stop`, which stops
    every Ray on the machine): SIGTERM, a grace period, then SIGKILL."""
    marker = session_dir.encode()

    def members() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
                except OSError:
                    continue
        return pids

    found = members()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)
    return len(found)


def status(settings: Settings) -> dict:
    report: dict = {"ray": "not running"}
    if not _cluster_running():
        return report
    import ray

    from actors.fleet import Fleet

    ray.init(address="auto", namespace=settings.namespace, logging_level="warning")
    report["ray"] = "running"
    try:
        report["shards"] = Fleet.connect(settings).stats()
    except Exception as exc:
        report["shards"] = f"not running ({exc})"
    try:
        url = f"http://127.0.0.1:{settings.http_port}/readyz"
        with urllib.request.urlopen(url, timeout=5) as reply:
            report["api"] = json.loads(reply.read())
    except Exception as exc:
        report["api"] = f"not answering ({exc})"
    return report
