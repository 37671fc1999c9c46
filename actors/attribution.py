"""Attribution on the write path: which recommendation an engagement belongs to. Pure
Python, no Ray.

A recommendations response has a ``rec_id``; the replica records what it showed (an
*exposure*: user, items in order, experiment, variant, time) and sends it to the
shard that owns the user. An event that names a ``rec_id`` belongs to that exposure;
one that does not is given to the latest exposure of its item to its user within the
attribution window, found in the shard's :class:`ExposureIndex`. The decision is made
once, before the journal append, and journaled with the batch (``refs``), so a replay
reproduces it without consulting the index, and a duplicate line (same file line or
Idempotency-Key) is dropped before it is ever decided. Each decision is kept as an
*attribution record* keyed by the event's (source, line): written at the checkpoint
that covers it, an overwrite when written again (replay after a crash), never a
second count.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from storage import codec

# Exposures remembered per user (the newest); an older one is rarely what a click
# answers, and the window drops it anyway.
EXPOSURES_PER_USER = 32


@dataclass(frozen=True)
class Exposure:
    """What one recommendations response showed: ``items`` in ranked order (the
    position of an item is its index)."""

    rec_id: str
    user_id: str
    at: float
    experiment: str | None
    variant: str | None
    items: tuple[str, ...]

    def encode(self) -> bytes:
        return codec.encode(
            {
                "r": self.rec_id,
                "u": self.user_id,
                "t": self.at,
                "e": self.experiment,
                "v": self.variant,
                "i": list(self.items),
            }
        )

    @classmethod
    def decode(cls, blob: bytes) -> Exposure:
        d = codec.decode(blob, what="exposure")
        return cls(d["r"], d["u"], d["t"], d.get("e"), d.get("v"), tuple(d.get("i") or ()))

    def as_dict(self) -> dict:
        return {
            "rec_id": self.rec_id,
            "user_id": self.user_id,
            "at": self.at,
            "experiment": self.experiment,
            "variant": self.variant,
            "items": list(self.items),
        }


@dataclass(frozen=True)
class Attribution:
    """An applied event and the exposure it was attributed to (``position``: where the
    item was in it, -1 when neither the event nor the index knew)."""

    rec_id: str
    user_id: str
    item_id: str
    action: str
    ts: float
    position: int

    def encode(self) -> bytes:
        return codec.encode(
            [self.rec_id, self.user_id, self.item_id, self.action, self.ts, self.position]
        )

    @classmethod
    def decode(cls, blob: bytes) -> Attribution:
        rec_id, user, item, action, ts, position = codec.decode(blob, what="attribution")
        return cls(rec_id, user, item, action, ts, position)


def attribution_key(source: str, line: int) -> str:
    """The key of an event's attribution: its (source, line), which the dedup index
    makes unique among applied events, so writing it again is an overwrite."""
    return f"{source}#{line}"


class ExposureIndex:
    """The recent exposures of resident users, newest last, bounded: at most
    ``max_users`` users (least recently exposed dropped first) and
    EXPOSURES_PER_USER each, none older than the window before the user's newest.

    >>> index = ExposureIndex(window_s=60, max_users=10)
    >>> index.note([Exposure("r1", "ann", 100.0, "exp", "a", ("x", "y"))])
    1
    >>> index.find("ann", "y", 130.0)
    ('r1', 1)
    >>> index.find("ann", "y", 161.0) is None
    True
    """

    def __init__(self, window_s: float, max_users: int):
        self.window_s = window_s
        self.max_users = max_users
        self._users: OrderedDict[str, deque] = OrderedDict()
        # rec_id -> (experiment, variant) of the exposures held: a resend is not noted
        # twice, and an attributed event is counted under its exposure's variant.
        self._arms: dict[str, tuple[str | None, str | None]] = {}

    def __len__(self) -> int:
        return len(self._users)

    def note(self, exposures: Iterable[Exposure]) -> int:
        """Remember exposures (any order); returns how many were new."""
        added = 0
        for exposure in sorted(exposures, key=lambda e: e.at):
            if exposure.rec_id in self._arms:
                continue
            entries = self._users.get(exposure.user_id)
            if entries is None:
                entries = self._users[exposure.user_id] = deque()
            self._users.move_to_end(exposure.user_id)
            positions = {item: n for n, item in reversed(list(enumerate(exposure.items)))}
            entries.append((exposure.at, exposure.rec_id, positions))
            self._arms[exposure.rec_id] = (exposure.experiment, exposure.variant)
            added += 1
            # Exposures a window older than the newest one can no longer be the latest
            # match of any event that could still arrive in order.
            while len(entries) > EXPOSURES_PER_USER or entries[0][0] < exposure.at - self.window_s:
                self._arms.pop(entries.popleft()[1], None)
        while len(self._users) > self.max_users:
            _user, entries = self._users.popitem(last=False)
            for _, rec_id, _ in entries:
                self._arms.pop(rec_id, None)
        return added

    def find(self, user_id: str, item_id: str, ts: float) -> tuple[str, int] | None:
        """(rec_id, position) of the latest exposure of ``item_id`` to ``user_id`` at
        or before ``ts`` and within the window, or None."""
        entries = self._users.get(user_id)
        if not entries:
            return None
        for at, rec_id, positions in reversed(entries):
            if at > ts or ts - at > self.window_s:
                continue
            position = positions.get(item_id)
            if position is not None:
                return rec_id, position
        return None

    def position_in(self, user_id: str, rec_id: str, item_id: str) -> int | None:
        """Where ``item_id`` was in exposure ``rec_id`` of the user, if it is held."""
        for _at, held, positions in reversed(self._users.get(user_id, ())):
            if held == rec_id:
                return positions.get(item_id)
        return None

    def arm_of(self, rec_id: str) -> tuple[str | None, str | None] | None:
        """(experiment, variant) of a held exposure, or None when it is not held."""
        return self._arms.get(rec_id)

    def forget_users(self, user_ids: Iterable[str]) -> None:
        for user in user_ids:
            entries = self._users.pop(user, None)
            for _, rec_id, _ in entries or ():
                self._arms.pop(rec_id, None)


def decide(
    index: ExposureIndex,
    events: Iterable[tuple],
    lines: Iterable[int],
    refs: Mapping[int, tuple[str | None, int | None]],
) -> dict[int, tuple[str, int]]:
    """The attribution of each event that has one, by line: an event's own ``rec_id``
    (its ``position`` if it sent one, else the item's place in the exposure when the
    index holds it, else -1), or the latest exposure of its item to its user within
    the window. Views are not attributed: showing is not engaging."""
    decided: dict[int, tuple[str, int]] = {}
    for event, line in zip(events, lines, strict=True):
        user, item, action, ts = event[0], event[1], event[2], event[3]
        rec_id, position = refs.get(line, (None, None))
        if rec_id:
            if position is None:
                position = index.position_in(user, rec_id, item)
            decided[line] = (rec_id, -1 if position is None else int(position))
        elif action != "view":
            found = index.find(user, item, ts)
            if found is not None:
                decided[line] = found
    return decided
