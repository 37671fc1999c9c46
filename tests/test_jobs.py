"""Ray jobs: file ingestion (dead letters, formats, failed batches, progress, exactly once
after a kill or with another batch size), a real `ray job submit` against a local head
followed by an HTTP read, and `persona demo`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
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

from actors.events import EventValidator
from jobs import ingest
from persona.errors import StoreUnavailable
from persona.settings import PROJECT_ROOT
from tests.ray_heads import START_API, Head, free_port

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
    assert fleet.get_profiles(["fmt-user"])["fmt-user"].events == 30
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
    assert sum(p.events for p in profiles.values()) == 150


def test_a_line_that_broke_validation_is_dead_lettered_not_lost(fleet, tmp_path):
    # Issue #11: the 8th line's unhashable action made the whole batch of lines 6-10
    # vanish while the job printed "applied 25, rejected 0" and exited 0.
    lines = [good(n) for n in range(1, 31)]
    lines[7] = {**good(8), "action": []}
    source = write_jsonl(tmp_path / "events.jsonl", lines)
    dead = tmp_path / "dead.jsonl"
    summary = ingest.run(
        [str(source)], settings=fleet.settings, batch_size=5, dead_letter=str(dead)
    )
    assert (summary.read, summary.applied, summary.rejected, summary.failed) == (30, 29, 1, 0)
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(letter["line"], letter["reason"]) for letter in letters] == [
        (8, "action must be a string, got list")
    ]


class FakeFleet:
    """The fleet's apply contract without Ray: validates, dedupes per (source, line),
    and refuses a batch with StoreUnavailable on the attempts ``fails(lines, attempt)``
    picks, as a store outage would."""

    def __init__(self, fails=lambda lines, attempt: False):
        self.validator = EventValidator(["view", "click"])
        self.fails = fails
        self.attempts: Counter = Counter()
        self.applied: set = set()

    def close(self) -> None:
        pass

    async def apply_async(self, source, events, *, lines=None, all_or_nothing=False):
        self.attempts[lines[0]] += 1
        if self.fails(lines, self.attempts[lines[0]]):
            raise StoreUnavailable("the store timed out")
        _, errors = self.validator.validate(events)
        refused = {error["index"] for error in errors}
        ack = {"applied": 0, "duplicate": 0, "rejected": len(errors), "errors": errors}
        for index, line in enumerate(lines):
            if index not in refused:
                ack["duplicate" if (source, line) in self.applied else "applied"] += 1
                self.applied.add((source, line))
        return ack


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(ingest, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))


def ingest_with(fleet, path: Path, batch_size: int = 5, **options) -> ingest.Summary:
    return asyncio.run(
        ingest.ingest_file(
            fleet,
            path,
            batch_size=batch_size,
            in_flight=options.pop("in_flight", 2),
            dead_letter=options.pop("dead_letter", io.StringIO()),
            **options,
        )
    )


def test_a_batch_that_keeps_failing_is_counted_named_and_the_rest_applied(tmp_path, no_backoff):
    source = write_jsonl(tmp_path / "events.jsonl", [good(n) for n in range(1, 31)])
    # Lines 6-10 fail on every attempt; lines 16-20 only on the first (then retried).
    fleet = FakeFleet(lambda lines, attempt: 8 in lines or (18 in lines and attempt == 1))
    summary = ingest_with(fleet, source)
    assert (summary.read, summary.applied, summary.rejected, summary.failed) == (30, 25, 0, 5)
    assert summary.read == summary.applied + summary.duplicate + summary.rejected + summary.failed
    assert fleet.attempts[6] == len(ingest.RETRY_DELAYS_S) + 1 and fleet.attempts[16] == 2
    assert len(summary.failures) == 1
    assert f"{source}: lines 6-10" in summary.failures[0]
    assert "the store timed out" in summary.failures[0]


def test_ingest_exits_non_zero_naming_the_lines_not_applied(
    tmp_path, monkeypatch, capsys, no_backoff
):
    import jobs.common

    records = [good(n) for n in range(1, 31)]
    records[1] = "{not json"
    source = write_jsonl(tmp_path / "events.jsonl", records)
    fleet = FakeFleet(lambda lines, attempt: 8 in lines or 27 in lines)
    monkeypatch.setattr(jobs.common, "fleet_for_job", lambda settings: fleet)
    dead = tmp_path / "dead.jsonl"
    code = ingest.main([str(source), "--batch", "5", "--dead-letter", str(dead)])
    out, err = capsys.readouterr()
    assert code != 0
    counts = json.loads(out.splitlines()[-1])
    assert (counts["read"], counts["applied"], counts["rejected"], counts["failed"]) == (
        30,
        20,
        1,
        9,
    )
    assert "failed 9" in out
    # Batches are lines 1-6 (line 2 is dead-lettered), 7-11, 12-16, 17-21, 22-26, 27-30.
    assert f"{source}: lines 7-11" in err and f"{source}: lines 27-30" in err
    # A second run sends only what is missing: nothing applied twice.
    fleet.fails = lambda lines, attempt: False
    assert ingest.main([str(source), "--batch", "5", "--dead-letter", str(dead)]) == 0
    counts = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (counts["applied"], counts["duplicate"], counts["failed"]) == (9, 20, 0)


def test_a_ray_data_read_task_reports_its_failed_batches(tmp_path, monkeypatch, no_backoff):
    import dataclasses

    import jobs.common
    from persona.settings import load_settings

    source = write_jsonl(tmp_path / "events.jsonl", [good(n) for n in range(1, 21)])
    fleet = FakeFleet(lambda lines, attempt: 12 in lines)
    monkeypatch.setattr(jobs.common, "fleet_for_job", lambda settings: fleet)
    row = {
        "path": str(source),
        "settings": dataclasses.asdict(load_settings()),
        "dead_letter": str(tmp_path / "dead.jsonl.0"),
        "batch": 5,
        "in_flight": 2,
    }
    summary = ingest.Summary.from_row(ingest._ingest_one_task(row))
    assert (summary.read, summary.applied, summary.failed) == (20, 15, 5)
    [failure] = summary.failures
    assert failure.startswith(f"{source}: lines 11-15: ") and "the store timed out" in failure


class RecordingProgress(ingest.Progress):
    """Keeps every position it is told, whatever the clock."""

    def __init__(self, total_bytes: int):
        super().__init__(total_bytes, io.StringIO())
        self.positions: list[int] = []

    def update(self, done_bytes: int, events: int, force: bool = False) -> None:
        self.positions.append(done_bytes)


def write_events(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, records)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=10)
        return path
    with path.open("wb") as f:
        for record in records:
            f.write(msgpack.packb(record))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".msgpack"])
def test_progress_follows_the_bytes_read_not_the_line_count(tmp_path, suffix):
    # Issue #12: the bar showed ~100% and ETA 0 s after the first batch.
    source = write_events(tmp_path / f"events{suffix}", [good(n) for n in range(100)])
    size = source.stat().st_size
    progress = RecordingProgress(size)
    ingest_with(FakeFleet(), source, batch_size=10, progress=progress)
    fractions = [position / size for position in progress.positions]
    assert len(fractions) == 10
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    # Records of about equal size: after k batches of 10, about k/10 of the file.
    for batches, fraction in enumerate(fractions, start=1):
        assert fraction == pytest.approx(batches / 10, abs=0.06), fractions


def test_rerun_with_another_batch_size_applies_nothing(fleet, tmp_path):
    records = [good(n, f"rerun-{n % 9}") for n in range(60)]
    records[20] = {**good(20), "action": "teleport"}
    source = write_jsonl(tmp_path / "events.jsonl", records)
    first = ingest.run([str(source)], settings=fleet.settings, batch_size=7)
    assert (first.applied, first.rejected, first.failed) == (59, 1, 0)
    second = ingest.run([str(source)], settings=fleet.settings, batch_size=3, in_flight=2)
    assert (second.applied, second.duplicate, second.rejected, second.failed) == (0, 59, 1, 0)
    profiles = fleet.get_profiles([f"rerun-{u}" for u in range(9)])
    assert sum(p.events for p in profiles.values()) == 59


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


PROFILE_COUNTS = textwrap.dedent(
    """
    import json, ray
    from actors.fleet import Fleet
    from persona.settings import load_settings
    settings = load_settings()
    ray.init(address="auto", namespace=settings.namespace, logging_level="error")
    users = json.loads({users!r})
    profiles = Fleet.connect(settings).get_profiles(users)
    print(json.dumps({{u: p.events for u, p in profiles.items()}}))
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
    # The rerun batches differently and keeps several batches in flight: what counts
    # is each line, not how the first run cut the file.
    rerun = [*command[:-4], "--batch", "37", "--in-flight", "4"]
    second = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=300)
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
    # The profile it printed was fetched over HTTP and holds every event of that user
    # in the file it generated, no more.
    user, events = re.search(r"Profile of (\S+) \(GET .*\n\s+events (\d+)", out).groups()
    generated = tmp_path / "demo" / "events.jsonl"
    expected = sum(json.loads(line)["user_id"] == user for line in generated.open())
    assert int(events) == expected > 0
    assert "top interests:" in out
    recommended = re.search(r"Recommendations for .*\n((?:   \S+  [-\d.]+  .*\n)+)", out)
    assert recommended and len(recommended.group(1).splitlines()) == 8
    # The evaluation table names Persona and the baselines measured in the same run.
    assert "Offline evaluation" in out and "item-knn" in out.lower() and "/docs" in out


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
