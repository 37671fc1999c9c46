"""Ray jobs: file ingestion (dead letters, formats, exactly once after a kill), a real
`ray job submit` against a local head followed by an HTTP read, and `persona demo`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import msgpack
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import ingest
from persona.settings import PROJECT_ROOT
from tests.ray_heads import Head, free_port

NOW = time.time()


def good(n: int, user: str | None = None) -> dict:
    return {
        "user_id": user or f"user-{n % 37}",
        "item_id": f"item-{n % 11}",
        "action": "view" if n % 3 else "click",
        "ts": NOW - 1000 + n,
        "topics": [f"t{n % 5}"],
    }


def write_jsonl(path: Path, records: list) -> Path:
    with path.open("w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def test_dead_letters_have_exact_lines_and_reasons(fleet, tmp_path):
    lines = [
        good(1),
        "{not json",
        good(2),
        {**good(3), "action": "teleport"},
        {**good(4), "ts": NOW * 1000},
        good(5),
        {"user_id": "only-a-user"},
    ]
    source = write_jsonl(tmp_path / "events.jsonl", lines)
    dead = tmp_path / "dead.jsonl"
    summary = ingest.run(
        [str(source)],
        settings=fleet.settings,
        batch_size=2,
        dead_letter=str(dead),
        distributed=False,
    )
    assert (summary.read, summary.applied, summary.rejected) == (7, 3, 4)
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    by_line = {letter["line"]: letter["reason"] for letter in letters}
    assert sorted(by_line) == [2, 4, 5, 7]
    assert "not valid JSON" in by_line[2]
    assert "unknown action 'teleport'" in by_line[4]
    assert "milliseconds sent as seconds" in by_line[5]
    assert "missing field(s): item_id, action, ts" in by_line[7]


def test_parquet_msgpack_directories_and_globs(fleet, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [good(n, "fmt-user") for n in range(10)])
    pq.write_table(
        pa.Table.from_pylist([good(n, "fmt-user") for n in range(10, 25)]), folder / "b.parquet"
    )
    with (folder / "c.msgpack").open("wb") as f:
        for n in range(25, 30):
            f.write(msgpack.packb(good(n, "fmt-user")))
    summary = ingest.run([str(folder)], settings=fleet.settings, distributed=False)
    assert (summary.files, summary.read, summary.applied) == (3, 30, 30)
    again = ingest.run([str(folder / "*.parquet")], settings=fleet.settings, distributed=False)
    assert (again.applied, again.duplicate) == (0, 15)
    assert fleet.get_profiles(["fmt-user"])["fmt-user"]["n"] == 30
    with pytest.raises(Exception, match="no such file"):
        ingest.run([str(tmp_path / "missing" / "*.jsonl")], settings=fleet.settings)


def test_many_files_spread_with_ray_data_stay_exactly_once(fleet, tmp_path):
    for part in range(3):
        write_jsonl(
            tmp_path / f"part-{part}.jsonl",
            [good(n, f"rd-{n % 4}") for n in range(part * 50, part * 50 + 50)],
        )
    first = ingest.run([str(tmp_path / "part-*.jsonl")], settings=fleet.settings, distributed=True)
    second = ingest.run([str(tmp_path / "part-*.jsonl")], settings=fleet.settings, distributed=True)
    assert (first.files, first.applied) == (3, 150)
    assert (second.applied, second.duplicate) == (0, 150)
    profiles = fleet.get_profiles([f"rd-{u}" for u in range(4)])
    assert sum(p["n"] for p in profiles.values()) == 150


# --- against a real local head with the jobs API --------------------------------------


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    cluster = Head(dashboard=True, extra=["--num-cpus=2", '--resources={"persona_shard": 16}'])
    data = tmp_path_factory.mktemp("head")
    cluster.settings_env = {
        "PERSONA_STORE_URL": f"sqlite:///{data}/persona.db",
        "PERSONA_DATA_DIR": str(data),
        "PERSONA_NAMESPACE": "persona-jobs-test",
        "PERSONA_PARTITIONS": "16",
        "PERSONA_HTTP_PORT": str(free_port()),
    }
    cluster.data = data
    yield cluster
    cluster.stop()


START_API = textwrap.dedent(
    """
    import json, ray
    from ray import serve
    from actors.fleet import Fleet
    from persona.settings import load_settings
    from serving.app import build_app
    settings = load_settings()
    ray.init(address="auto", namespace=settings.namespace, logging_level="error")
    Fleet.start(settings)
    serve.start(http_options={"host": "127.0.0.1", "port": settings.http_port})
    serve.run(build_app(), name="persona", route_prefix="/")
    print(json.dumps({"port": settings.http_port}))
    """
)

PROFILE_COUNTS = textwrap.dedent(
    """
    import json, ray
    from actors.fleet import Fleet
    from persona.settings import load_settings
    settings = load_settings()
    ray.init(address="auto", namespace=settings.namespace, logging_level="error")
    users = json.loads({users!r})
    print(json.dumps({{u: p["n"] for u, p in Fleet.connect(settings).get_profiles(users).items()}}))
    """
)


def test_ray_job_submit_ingest_then_read_over_http(head, tmp_path):
    import httpx

    port = head.run_python(START_API, env=head.settings_env)["port"]
    source = write_jsonl(tmp_path / "job-events.jsonl", [good(n, "job-user") for n in range(40)])
    runtime_env = json.dumps({"env_vars": head.settings_env})
    submitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "job",
            "submit",
            "--address",
            head.dashboard,
            "--working-dir",
            str(PROJECT_ROOT),
            "--runtime-env-json",
            runtime_env,
            "--",
            "python",
            "-m",
            "jobs.ingest",
            str(source),
        ],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "applied 40" in submitted.stdout
    profile = httpx.get(f"http://127.0.0.1:{port}/v1/users/job-user/profile", timeout=30).json()
    assert profile["events"] == 40


def test_ingest_killed_halfway_and_run_again_applies_every_event_once(head, tmp_path):
    events = [good(n, f"kill-{n % 50}") for n in range(40_000)]
    source = write_jsonl(tmp_path / "big.jsonl", events)
    env = {**head.env, "RAY_ADDRESS": head.address, **head.settings_env}
    command = [
        sys.executable,
        "-m",
        "jobs.ingest",
        str(source),
        "--batch",
        "100",
        "--in-flight",
        "1",
    ]
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    users = [f"kill-{u}" for u in range(50)]
    deadline = time.monotonic() + 120
    applied = 0
    while time.monotonic() < deadline:
        time.sleep(1.0)
        counts = head.run_python(
            PROFILE_COUNTS.format(users=json.dumps(users)), env=head.settings_env
        )
        applied = sum(counts.values())
        if applied >= 500 or first.poll() is not None:
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert 0 < applied < len(events), "the kill must land halfway"
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    counts = head.run_python(PROFILE_COUNTS.format(users=json.dumps(users)), env=head.settings_env)
    assert counts == dict(Counter(e["user_id"] for e in events))


def test_demo_once_runs_end_to_end(tmp_path):
    env = {
        **os.environ,
        "PERSONA_DATA_DIR": str(tmp_path),
        "PERSONA_HTTP_PORT": str(free_port()),
        "PERSONA_SIGNALS_REFRESH_S": "1",
        "RAY_AUTH_MODE": "disabled",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "demo",
            "--once",
            "--users",
            "200",
            "--items",
            "150",
            "--events",
            "6000",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "applied 6,000" in out
    assert "Profile of user-" in out and "top interests:" in out
    assert "Recommendations for user-" in out and "/docs" in out


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_export_writes_every_profile(fleet, tmp_path, suffix):
    from jobs import export

    fleet.apply("exp", [good(n, f"exp-{n % 7}") for n in range(70)])
    fleet.delete_user("exp-3")
    out = tmp_path / f"profiles.{suffix}"
    assert export.run(out, settings=fleet.settings) == 6
    if suffix == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        rows = pq.read_table(out).to_pylist()
    assert sorted(r["user_id"] for r in rows) == [f"exp-{n}" for n in range(7) if n != 3]
    assert all(r["events"] == 10 for r in rows)
    with pytest.raises(Exception, match=r"\.parquet or \.jsonl"):
        export.run(tmp_path / "profiles.csv", settings=fleet.settings)
