"""`persona up|down|status`: a local Ray head with the shards and the Serve app, and its teardown.

`up` records what it started in <data_dir>/up.json; `down` stops exactly that:
the Serve app, the shard actors (state stays in the store) and, if `up` started
it, the Ray head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(HAPROXY_ENV if haproxy else {})}
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
    fleet = Fleet.start(settings)
    serve.start(http_options={"host": "127.0.0.1", "port": settings.http_port})
    serve.run(build_app(), name=APP_NAME, route_prefix="/", blocking=False)
    state = {
        "ray_started": started_ray,
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
        if state.get("ray_started"):
            subprocess.run(
                [sys.executable, "-m", "ray.scripts.scripts", "stop"],
                check=False,
                capture_output=True,
            )
            done.append("Ray head stopped")
    path.unlink(missing_ok=True)
    return done or ["nothing was running"]


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
