"""Exposure logging in an ingress replica: what each recommendations response showed,
kept in a bounded buffer and flushed in batches, never a store call per request.

A response adds one small record to a deque (about a microsecond). Every
``exposure_flush_s`` the replica's flusher takes the whole buffer, sends each shard
its users' exposures (one actor call per shard: the shards attribute events that
carry no rec_id from them), then writes the batch to the store's ``exposures``
table. Bounded memory: past ``exposure_buffer`` records the *oldest* is dropped and
counted (``dropped``, ``ray_persona_exposures_dropped``), so a slow or unreachable
store costs exposures, never the latency or the memory of recommendations. A flush
the store refuses goes back to the front of the buffer (under the same bound) and
is retried on the next interval; a rec_id written twice is one row.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from actors.attribution import Exposure
from persona.errors import PersonaError

log = logging.getLogger(__name__)


class ExposureLog:
    """The replica's buffer of exposures not yet flushed.

    >>> log = ExposureLog(capacity=2)
    >>> for n in range(3):
    ...     log.add(Exposure(f"r{n}", "ann", float(n), "exp", "a", ("x",)))
    >>> [e.rec_id for e in log.take()], log.dropped
    (['r1', 'r2'], 1)
    """

    def __init__(self, capacity: int, on_written: Callable[[list[Exposure]], None] | None = None):
        self.capacity = capacity
        # Told of each batch the store took (the replica's exposure metrics).
        self.on_written = on_written
        self._buffer: deque[Exposure] = deque()
        self.added = 0
        self.dropped = 0
        self.flushed = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, exposure: Exposure) -> None:
        self._buffer.append(exposure)
        self.added += 1
        if len(self._buffer) > self.capacity:
            self._buffer.popleft()
            self.dropped += 1

    def take(self) -> list[Exposure]:
        taken = list(self._buffer)
        self._buffer.clear()
        return taken

    def put_back(self, exposures: list[Exposure]) -> None:
        """Return a batch that could not be written, ahead of newer ones; what no
        longer fits is dropped oldest first, like any overflow."""
        room = self.capacity - len(self._buffer)
        keep = exposures[len(exposures) - room :] if room < len(exposures) else exposures
        self.dropped += len(exposures) - len(keep)
        self._buffer.extendleft(reversed(keep))

    async def flush(self, store, fleet, ttl_s: int) -> int:
        """Send the buffer to the owning shards, then write it to the store; returns
        how many were written. On a store error the batch goes back to the buffer."""
        batch = self.take()
        if not batch:
            return 0
        if fleet is not None:
            try:
                await fleet.note_exposures_async(batch)
            except PersonaError as exc:  # no assignment readable: attribution by rec_id
                log.warning("exposures not sent to the shards: %s", exc)
        records = {e.rec_id: (e.at, e.encode()) for e in batch}
        try:
            await asyncio.to_thread(store.put_exposures, records, ttl_s)
        except PersonaError as exc:
            self.put_back(batch)
            log.warning("exposures not written (%d kept for the next flush): %s", len(batch), exc)
            return 0
        self.flushed += len(batch)
        if self.on_written is not None:
            self.on_written(batch)
        return len(batch)

    def stats(self) -> dict:
        return {
            "buffered": len(self._buffer),
            "added": self.added,
            "flushed": self.flushed,
            "dropped": self.dropped,
        }
