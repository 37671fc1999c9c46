"""Ingest event files into the shards: JSONL, Parquet or msgpack; a file, a directory or a glob.

    python -m jobs.ingest PATH [PATH ...] [--batch 5000] [--in-flight 4] [--dead-letter FILE]
    ray job submit --working-dir . -- python -m jobs.ingest data/events/

Streams with bounded memory (one batch per in-flight slot), writes invalid lines
to a dead-letter file with line number and reason, and sends every event with
the file's identity and its line, so a job killed halfway and run again, with
any --batch, applies every event exactly once. A batch that still fails after
its retries is counted as failed and named (file, lines) while the other batches
go on; the job then exits non-zero. Several files are spread over the cluster
with Ray Data: one read task per file, each sending its batches straight to the
owning shards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import glob
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from persona.errors import PersonaError
from persona.settings import Settings

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".msgpack": "msgpack",
    ".mpk": "msgpack",
}


# Waits between attempts at a batch the store or a shard refused: a restart or a
# short outage is ridden out (about 35 s in all) before the batch counts as failed.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0)

COUNTS = ("files", "read", "applied", "duplicate", "rejected", "failed")


@dataclass
class Summary:
    """What a job did. Every line read is counted once:
    read = applied + duplicate + rejected + failed."""

    files: int = 0
    read: int = 0
    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    # Events in batches that were not acknowledged after their retries: maybe applied
    # in part, so a rerun sends them again and the shards skip what they already have.
    failed: int = 0
    seconds: float = 0.0
    dead_letter: str | None = None
    # One "<file>: lines <first>-<last>: <error>" per failed batch.
    failures: list[str] = field(default_factory=list)

    def add(self, other: Summary) -> None:
        for key in COUNTS:
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.failures += other.failures

    def to_row(self) -> dict:
        """A Ray Data row: scalars only (a list column's type varies from block to block)."""
        return {**{k: getattr(self, k) for k in COUNTS}, "failures": json.dumps(self.failures)}

    @classmethod
    def from_row(cls, row: dict) -> Summary:
        return cls(**{k: int(row[k]) for k in COUNTS}, failures=json.loads(row["failures"]))

    def counts(self) -> dict:
        return {**{k: getattr(self, k) for k in COUNTS}, "seconds": self.seconds}

    def line(self) -> str:
        return (
            f"read {self.read:,}  applied {self.applied:,}  duplicate {self.duplicate:,}  "
            f"rejected {self.rejected:,}  failed {self.failed:,}  in {self.seconds:.1f}s"
            + (
                f"  (dead letters: {self.dead_letter})"
                if self.rejected and self.dead_letter
                else ""
            )
        )


def expand(paths: list[str]) -> list[Path]:
    """Files named directly, found in directories, or matched by globs, in order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in FORMATS and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            if not matches:
                raise PersonaError(f"no such file, directory or glob match: {raw}")
            found += [m for m in matches if m.is_file()]
    for path in found:
        if path.suffix not in FORMATS:
            raise PersonaError(
                f"{path}: unknown format {path.suffix!r}; use {', '.join(sorted(FORMATS))}"
            )
    return found


def file_identity(path: Path) -> str:
    """Stable across runs and machines: name, size and a hash of the first megabyte."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    return f"{path.name}:{path.stat().st_size}:{digest.hexdigest()[:16]}"


class Record(NamedTuple):
    """One record of a file, as read."""

    line: int  # line (JSONL) or record/row number (msgpack, Parquet), from 1
    value: Any  # the decoded record, or None when it could not be decoded
    problem: str | None  # why it could not be decoded
    offset: int  # bytes of the file consumed once this record is read: for progress


def read_records(path: Path) -> Iterator[Record]:
    """Every record of a file, streamed, with how far into the file it ends."""
    kind = FORMATS[path.suffix]
    if kind == "jsonl":
        with path.open("rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                offset += len(raw)
                if not raw.strip():
                    continue
                try:
                    yield Record(number, json.loads(raw), None, offset)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield Record(number, None, f"not valid JSON: {exc}", offset)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        # Columns are compressed and spread over the file: rows read over the rows in
        # the footer is the fraction done, scaled to the file's size.
        size, rows = path.stat().st_size, max(parquet.metadata.num_rows, 1)
        number = 0
        for batch in parquet.iter_batches(batch_size=10_000):
            for record in batch.to_pylist():
                number += 1
                if record.get("topics") is None:
                    record.pop("topics", None)
                value = {k: v for k, v in record.items() if v is not None}
                yield Record(number, value, None, size * number // rows)
    else:
        with path.open("rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
            number = 0
            try:
                for value in unpacker:
                    number += 1
                    # tell(): the bytes decoded so far, not what was buffered ahead.
                    yield Record(number, value, None, unpacker.tell())
            except (ValueError, msgpack.UnpackException) as exc:
                problem = f"undecodable msgpack from here on: {exc}"
                yield Record(number + 1, None, problem, path.stat().st_size)


class Progress:
    """A progress bar with events/s and ETA on a terminal; periodic log lines otherwise."""

    def __init__(self, total_bytes: int, stream=sys.stderr, interval_s: float = 5.0):
        self.total = max(total_bytes, 1)
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.2 if self.tty else interval_s
        self.started = self.last = time.monotonic()

    def update(self, done_bytes: int, events: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        fraction = min(done_bytes / self.total, 1.0)
        rate = events / elapsed
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("inf")
        eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        if self.tty:
            bar = "#" * int(fraction * 30)
            self.stream.write(
                f"\r[{bar:<30}] {fraction:6.1%}  {events:>10,} events  "
                f"{rate:>9,.0f}/s  ETA {eta_text}"
            )
            if force:
                self.stream.write("\n")
        else:
            self.stream.write(
                f"ingest: {fraction:.1%} {events:,} events {rate:,.0f}/s ETA {eta_text}\n"
            )
        self.stream.flush()


async def ingest_file(
    fleet,
    path: Path,
    *,
    batch_size: int,
    in_flight: int,
    dead_letter,
    progress: Progress | None = None,
    bytes_before: int = 0,
) -> Summary:
    """Stream one file to the shards with at most ``in_flight`` batches outstanding.

    Every batch's outcome is collected: a batch that fails after its retries is
    counted in ``failed`` and named in ``failures``, and the other batches go on."""
    summary = Summary(files=1)
    identity = file_identity(path)
    failures: list[tuple[int, str]] = []
    outstanding: set[asyncio.Task] = set()
    others_allowed = max(in_flight, 1) - 1  # outstanding while the next batch waits

    async def send(lines: list[int], events: list) -> None:
        try:
            ack = await _apply_with_retries(fleet, identity, events, lines)
        except Exception as exc:  # any error: this batch is lost, the file goes on
            summary.failed += len(events)
            failures.append(
                (lines[0], f"{path}: lines {lines[0]}-{lines[-1]}: {type(exc).__name__}: {exc}")
            )
            return
        summary.applied += ack["applied"]
        summary.duplicate += ack["duplicate"]
        summary.rejected += ack["rejected"]
        for error in ack["errors"]:
            index = error["index"]
            _dead(dead_letter, path, lines[index], error["reason"], events[index])

    async def collect(until_at_most: int) -> None:
        # Through result(), never a discard: whatever a batch raised surfaces here.
        while len(outstanding) > until_at_most:
            done, _ = await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                outstanding.remove(task)
                task.result()

    batch: list = []
    lines: list[int] = []
    for record in read_records(path):
        summary.read += 1
        if record.problem:
            summary.rejected += 1
            _dead(dead_letter, path, record.line, record.problem, None)
            continue
        batch.append(record.value)
        lines.append(record.line)
        if len(batch) >= batch_size:
            await collect(until_at_most=others_allowed)
            outstanding.add(asyncio.create_task(send(lines, batch)))
            batch, lines = [], []
            if progress:
                progress.update(bytes_before + record.offset, summary.read)
    if batch:
        await collect(until_at_most=others_allowed)
        outstanding.add(asyncio.create_task(send(lines, batch)))
    await collect(until_at_most=0)
    summary.failures = [text for _, text in sorted(failures)]
    return summary


async def _apply_with_retries(fleet, identity: str, events: list, lines: list[int]) -> dict:
    """Store outages and shard restarts are retried with backoff; shards remember each
    (file, line) they applied, so a retried batch is applied exactly once."""
    import ray

    for delay in (*RETRY_DELAYS_S, None):
        try:
            return await fleet.apply_async(identity, events, lines=lines)
        except (PersonaError, ray.exceptions.RayActorError):
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _dead(dead_letter, path: Path, line: int, reason: str, record) -> None:
    dead_letter.write(
        json.dumps(
            {"file": str(path), "line": line, "reason": reason, "record": record}, default=str
        )
        + "\n"
    )


def _ingest_one_task(row: dict) -> dict:
    """Ray Data read task: one file, its batches straight to the owning shards."""
    from jobs.common import fleet_for_job

    settings = Settings(**row["settings"])
    path = Path(row["path"])
    # The worker process outlives the task: the task's store session must not.
    with (
        contextlib.closing(fleet_for_job(settings)) as fleet,
        open(row["dead_letter"], "a") as dead,
    ):
        summary = asyncio.run(
            ingest_file(
                fleet, path, batch_size=row["batch"], in_flight=row["in_flight"], dead_letter=dead
            )
        )
    return summary.to_row()


def task_rows(
    files: list[Path], settings: Settings, dead_path: str, batch_size: int, in_flight: int
) -> list[dict]:
    """One Ray Data row per file. Each carries the settings without the API token: a
    job talks to the shards, not the API, and rows sit in the object store."""
    settings_row = dataclasses.asdict(settings.public())
    return [
        {
            "path": str(p.resolve()),
            "settings": settings_row,
            "dead_letter": str(Path(dead_path).resolve()) + f".{n}",
            "batch": batch_size,
            "in_flight": in_flight,
        }
        for n, p in enumerate(files)
    ]


def run(
    paths: list[str],
    *,
    settings: Settings | None = None,
    batch_size: int = 5_000,
    in_flight: int = 4,
    dead_letter: str | None = None,
    distributed: bool | None = None,
    stream=sys.stderr,
) -> Summary:
    from jobs.common import fleet_for_job, settings_for_command

    settings = settings or settings_for_command()
    files = expand(paths)
    # The job's store session is closed when it ends (Ray Data tasks close their own).
    with contextlib.closing(fleet_for_job(settings)) as fleet:
        dead_path = dead_letter or str(Path(settings.data_dir) / "dead-letter.jsonl")
        Path(dead_path).parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        total = Summary(dead_letter=dead_path)
        if distributed is None:
            distributed = len(files) > 1
        if distributed:
            import ray.data

            rows = task_rows(files, settings, dead_path, batch_size, in_flight)
            results = ray.data.from_items(rows).map(_ingest_one_task).take_all()
            with open(dead_path, "w") as merged:
                for row in rows:
                    part = Path(row["dead_letter"])
                    if part.exists():
                        merged.write(part.read_text())
                        part.unlink()
            for result in results:
                total.add(Summary.from_row(result))
        else:
            progress = Progress(sum(p.stat().st_size for p in files), stream)
            done = 0
            with open(dead_path, "w") as dead:
                for path in files:
                    total.add(
                        asyncio.run(
                            ingest_file(
                                fleet,
                                path,
                                batch_size=batch_size,
                                in_flight=in_flight,
                                dead_letter=dead,
                                progress=progress,
                                bytes_before=done,
                            )
                        )
                    )
                    done += path.stat().st_size
                    progress.update(done, total.read, force=True)
    total.seconds = time.monotonic() - started
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="files, directories or globs")
    parser.add_argument("--batch", type=int, default=5_000, help="events per batch")
    parser.add_argument("--in-flight", type=int, default=4, help="batches outstanding at once")
    parser.add_argument(
        "--dead-letter", help="where invalid lines go (default data/dead-letter.jsonl)"
    )
    parser.add_argument(
        "--distributed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="spread files over the cluster with Ray Data (default: when >1 file)",
    )
    args = parser.parse_args(argv)
    try:
        summary = run(
            args.paths,
            batch_size=args.batch,
            in_flight=args.in_flight,
            dead_letter=args.dead_letter,
            distributed=args.distributed,
        )
    except PersonaError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    print(f"ingest: {summary.line()}")
    print(json.dumps(summary.counts()))
    if summary.failed:
        print(
            f"ingest: {summary.failed:,} events in {len(summary.failures)} failed batch(es) "
            "were not acknowledged; run the same command again to send them (events already "
            "applied are skipped):",
            file=sys.stderr,
        )
        shown = 20
        for failure in summary.failures[:shown]:
            print(f"  {failure}", file=sys.stderr)
        if len(summary.failures) > shown:
            print(f"  ... and {len(summary.failures) - shown} more", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
