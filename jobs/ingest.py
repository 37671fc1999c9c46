"""Ingest event files into the shards: JSONL, Parquet or msgpack; a file, a directory or a glob.

    python -m jobs.ingest PATH [PATH ...] [--batch 5000] [--in-flight 4] [--dead-letter FILE]
    ray job submit --working-dir . -- python -m jobs.ingest data/events/

Streams with bounded memory (one batch per in-flight slot), writes invalid lines
to a dead-letter file with line number and reason, and derives batch ids from
the file's identity and the line offset, so a job killed halfway and run again
applies every event exactly once. Several files are spread over the cluster
with Ray Data: one read task per file, each sending its batches straight to the
owning shards.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from persona.errors import PersonaError
from persona.settings import Settings, load_settings

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".msgpack": "msgpack",
    ".mpk": "msgpack",
}


@dataclass
class Summary:
    files: int = 0
    read: int = 0
    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    seconds: float = 0.0
    dead_letter: str | None = None
    errors: list[str] = field(default_factory=list)

    def add(self, other: Summary) -> None:
        for key in ("files", "read", "applied", "duplicate", "rejected"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.errors += other.errors

    def line(self) -> str:
        return (
            f"read {self.read:,}  applied {self.applied:,}  duplicate {self.duplicate:,}  "
            f"rejected {self.rejected:,}  in {self.seconds:.1f}s"
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


def read_records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(line or row number from 1, record or None, problem) for every record, streamed."""
    kind = FORMATS[path.suffix]
    if kind == "jsonl":
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, json.loads(raw), None
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield number, None, f"not valid JSON: {exc}"
    elif kind == "parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for record in batch.to_pylist():
                number += 1
                if record.get("topics") is None:
                    record.pop("topics", None)
                yield number, {k: v for k, v in record.items() if v is not None}, None
    else:
        with path.open("rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
            number = 0
            try:
                for record in unpacker:
                    number += 1
                    yield number, record, None
            except (ValueError, msgpack.UnpackException) as exc:
                yield number + 1, None, f"undecodable msgpack from here on: {exc}"


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
    """Stream one file to the shards with at most ``in_flight`` batches outstanding."""
    summary = Summary(files=1)
    identity = file_identity(path)
    size = path.stat().st_size
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task] = set()

    async def send(first_line: int, lines: list[int], events: list) -> None:
        try:
            ack = await _apply_with_retries(fleet, f"{identity}@{first_line}", events)
            summary.applied += ack["applied"]
            summary.duplicate += ack["duplicate"]
            summary.rejected += ack["rejected"]
            for error in ack["errors"]:
                _dead(
                    dead_letter,
                    path,
                    lines[error["index"]],
                    error["reason"],
                    events[error["index"]],
                )
        finally:
            slots.release()

    batch: list = []
    lines: list[int] = []
    first = 1
    for number, record, problem in read_records(path):
        summary.read += 1
        if problem:
            summary.rejected += 1
            _dead(dead_letter, path, number, problem, None)
            continue
        if not batch:
            first = number
        batch.append(record)
        lines.append(number)
        if len(batch) >= batch_size:
            await slots.acquire()
            task = asyncio.create_task(send(first, lines, batch))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            batch, lines = [], []
            if progress:
                progress.update(
                    bytes_before + _position(path, number, summary.read, size), summary.read
                )
    if batch:
        await slots.acquire()
        tasks.add(asyncio.create_task(send(first, lines, batch)))
    if tasks:
        await asyncio.gather(*tasks)
    return summary


def _position(path: Path, number: int, read: int, size: int) -> int:
    # Good enough for an ETA: assume records of equal size over the file.
    return min(size, int(size * read / max(number, 1))) if number else 0


async def _apply_with_retries(fleet, batch_id: str, events: list, attempts: int = 8) -> dict:
    """Store outages and shard restarts are retried with backoff; the batch id keeps it
    exactly once."""
    import ray

    for attempt in range(attempts):
        try:
            return await fleet.apply_async(batch_id, events)
        except (PersonaError, ray.exceptions.RayActorError) as exc:
            if attempt == attempts - 1:
                raise PersonaError(f"batch {batch_id} failed {attempts} times: {exc}") from exc
            await asyncio.sleep(min(10.0, 0.5 * 2**attempt))
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
    fleet = fleet_for_job(settings)
    path = Path(row["path"])
    with open(row["dead_letter"], "a") as dead:
        summary = asyncio.run(
            ingest_file(
                fleet, path, batch_size=row["batch"], in_flight=row["in_flight"], dead_letter=dead
            )
        )
    return {k: getattr(summary, k) for k in ("files", "read", "applied", "duplicate", "rejected")}


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
    import dataclasses

    from jobs.common import fleet_for_job

    settings = settings or load_settings()
    files = expand(paths)
    fleet = fleet_for_job(settings)
    dead_path = dead_letter or str(Path(settings.data_dir) / "dead-letter.jsonl")
    Path(dead_path).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    total = Summary(dead_letter=dead_path)
    if distributed is None:
        distributed = len(files) > 1
    if distributed:
        import ray.data

        rows = [
            {
                "path": str(p.resolve()),
                "settings": dataclasses.asdict(settings),
                "dead_letter": str(Path(dead_path).resolve()) + f".{n}",
                "batch": batch_size,
                "in_flight": in_flight,
            }
            for n, p in enumerate(files)
        ]
        results = ray.data.from_items(rows).map(_ingest_one_task).take_all()
        with open(dead_path, "w") as merged:
            for row in rows:
                part = Path(row["dead_letter"])
                if part.exists():
                    merged.write(part.read_text())
                    part.unlink()
        for result in results:
            total.add(Summary(**result))
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
    print(
        json.dumps(
            {
                k: getattr(summary, k)
                for k in ("files", "read", "applied", "duplicate", "rejected", "seconds")
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
