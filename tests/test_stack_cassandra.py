"""`persona up --store cassandra://...` as an operator runs it (issue #12, "Done when"):
every component on the Cassandra store, readiness that follows the node, and `persona
scale` out and in under HTTP load that loses, doubles and blocks nothing.

Real processes only: a Cassandra node of this test's own (it is stopped at the end; the
suite's node is never touched), the `persona` CLI for up, status, scale, checkpoint and
down, HTTP clients posting batches, each retried under its Idempotency-Key until it is
acknowledged. What the stack did is read from the keyspace itself (its assignments,
catalog and profiles tables), never from what the commands say about themselves.

The original defect: after `persona up --store cassandra://...`, `persona scale --shards
4` and then `--shards 3` wrote the new assignments to the default SQLite store, and a
third of the partitions answered 503 partition_moving (after hanging for the re-route
deadline) for good. Here, after each scale, one write touching every partition must be
acknowledged on its first attempt. Waits poll a condition with a deadline; nothing is
asserted about how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from actors.profile import Profile, ProfileRules
from actors.routing import partition_of
from jobs.local import session_members
from persona.settings import load_settings
from storage import codec
from storage.cassandra_local import LocalNode
from tests.conftest import require_cassandra
from tests.load import PostingThreads
from tests.ray_heads import free_port, persona, stack_env
from tests.test_fault_run import read_profiles
from tests.test_shards import NOW, make_batch, reference_profiles

PARTITIONS = 24
USERS = 200
POSTERS = 3
BATCH = 30
# Longer than the fleet's re-route deadline (actors.fleet.REROUTE_SECONDS, 30 s): a write
# that cannot be routed answers 503 partition_moving before the client gives up, so the
# test sees what the server said rather than its own timeout.
POST_TIMEOUT_S = 90.0
BATCH_DEADLINE_S = 180.0


@pytest.fixture
def node(tmp_path_factory):
    """A Cassandra node of this test's own, on free ports: the test stops it."""
    require_cassandra()  # the jars and Java are there when the suite's node runs
    own = LocalNode.from_settings(
        load_settings(
            data_dir=str(tmp_path_factory.mktemp("stack-cassandra")),
            cassandra_port=free_port(),
            cassandra_storage_port=free_port(),
        )
    )
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture
def stack(node, tmp_path):
    """The environment `persona` runs with (its own ports and data dir) and the store URL
    to bring it up on; whatever the test leaves running is stopped."""
    env = stack_env(tmp_path, PERSONA_PARTITIONS=PARTITIONS)
    env.pop("PERSONA_STORE_URL", None)
    keyspace = f"stack_{uuid.uuid4().hex[:8]}"
    url = f"cassandra://127.0.0.1:{node.native_port}/{keyspace}?replication=1&consistency=ONE"
    yield env, url, keyspace, f"http://127.0.0.1:{env['PERSONA_HTTP_PORT']}"
    persona(env, "down")


def succeeded(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@contextlib.contextmanager
def keyspace(node: LocalNode, name: str):
    """A CQL session on the stack's keyspace, straight to the node."""
    from cassandra.cluster import Cluster

    cluster = Cluster(["127.0.0.1"], port=node.native_port, connect_timeout=10)
    try:
        yield cluster.connect(name)
    finally:
        cluster.shutdown()


def owners(session) -> dict[int, tuple[str, int]]:
    """partition -> (owner, epoch), as the keyspace's assignments table holds them."""
    rows = session.execute("SELECT partition, owner, epoch FROM assignments")
    return {r.partition: (r.owner, r.epoch) for r in rows}


def shard_loads(assignments: dict[int, tuple[str, int]]) -> dict[str, int]:
    return dict(Counter(owner for owner, _epoch in assignments.values()))


class Load(PostingThreads):
    """HTTP clients posting batches of events, each retried under its own key until it
    is acknowledged; every answer that was not 200 is kept with its error code."""

    def __init__(self, api: str):
        super().__init__(POSTERS, BATCH_DEADLINE_S)
        self.api = api
        self.refusals: Counter = Counter()  # (status, error code) of every answer but 200
        self.dropped = 0  # attempts without an answer (client timeout, dropped connection)

    def wait_for(self, more: int, timeout_s: float = 120.0) -> None:
        """Until ``more`` further batches are acknowledged (traffic flows)."""
        target = self.acknowledged() + more
        deadline = time.monotonic() + timeout_s
        while self.acknowledged() < target and not self.problems:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not self.problems, self.problems
        assert self.acknowledged() >= target, (
            f"{self.acknowledged()} of {target} batches acknowledged; "
            f"refusals {dict(self.refusals)}, dropped {self.dropped}"
        )

    def _run(self, n: int) -> None:
        rng = random.Random(500 + n)
        with httpx.Client(base_url=self.api, timeout=POST_TIMEOUT_S) as client:
            number = 0
            while not self.stop.is_set():
                batch = make_batch(rng, BATCH, users=USERS)
                try:
                    self.post_until_acknowledged(client, f"load-{n}-{number}", batch)
                except Exception as exc:  # reported by wait_for and the test
                    with self.lock:
                        self.problems.append(f"poster {n} batch {number}: {exc!r}")
                    return
                with self.lock:
                    self.acked.append(batch)
                number += 1
                self.stop.wait(0.02)

    def post_until_acknowledged(self, client: httpx.Client, key: str, events: list) -> dict:
        started = time.monotonic()
        while time.monotonic() - started < BATCH_DEADLINE_S:
            try:
                reply = client.post("/v1/events", json=events, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                with self.lock:
                    self.dropped += 1
                time.sleep(0.2)
                continue
            if reply.status_code == 200:
                ack = reply.json()
                assert (ack["applied"] + ack["duplicate"], ack["rejected"]) == (len(events), 0), (
                    key,
                    ack,
                )
                return ack
            code = reply.json().get("error", {}).get("code") if reply.content else None
            with self.lock:
                self.refusals[(reply.status_code, code)] += 1
                if reply.status_code != 503:
                    self.problems.append(f"{key}: HTTP {reply.status_code}: {reply.text[:500]}")
            time.sleep(0.2)
        raise AssertionError(f"{key} was not acknowledged in {BATCH_DEADLINE_S:.0f}s")


def every_partition(round_: str) -> list[dict]:
    """One event for a user of each partition: a write that needs every shard."""
    events, n = {}, 0
    while len(events) < PARTITIONS:
        user = f"probe-{round_}-{n}"
        events.setdefault(partition_of(user, PARTITIONS), user)
        n += 1
    return [
        {"user_id": user, "item_id": "item-1", "action": "click", "ts": NOW - 60, "topics": []}
        for _partition, user in sorted(events.items())
    ]


def write_to_every_partition(api: str, round_: str) -> list[dict]:
    """After a scale every partition takes writes at once: the first attempt of a write
    to all of them is acknowledged (the defect answered 503 partition_moving, for good)."""
    events = every_partition(round_)
    reply = httpx.post(
        f"{api}/v1/events",
        json=events,
        headers={"Idempotency-Key": f"every-partition-{round_}"},
        timeout=POST_TIMEOUT_S,
    )
    assert reply.status_code == 200, f"after {round_}: {reply.status_code} {reply.text}"
    assert reply.json()["applied"] == PARTITIONS, reply.json()
    return events


def scale(env: dict, shards: int, session, load: Load) -> dict:
    """`persona scale --shards N` while the load runs; the keyspace's assignments after."""
    before = owners(session)
    acked_before = load.acknowledged()
    out = succeeded(persona(env, "scale", "--shards", str(shards)))
    after = owners(session)
    wanted = {f"persona-shard-{i}" for i in range(shards)}
    assert set(shard_loads(after)) == wanted, (out, shard_loads(after))
    loads = shard_loads(after).values()
    assert sum(loads) == PARTITIONS and max(loads) - min(loads) <= 1, shard_loads(after)
    moved = {p for p in after if after[p][0] != before[p][0]}
    assert moved, out
    # A moved partition's epoch advanced (the fence); the others kept theirs.
    assert all(after[p][1] > before[p][1] for p in moved), (before, after)
    assert all(after[p] == before[p] for p in set(after) - moved), (before, after)
    return {
        "moved": len(moved),
        "acked_while_scaling": load.acknowledged() - acked_before,
        "output": out.strip().splitlines(),
    }


def assert_counts_match(got: dict[str, dict | None], expected: dict[str, Profile], rules) -> None:
    """Every user's events, per action and in all, and first and last seen, as the
    acknowledged batches make them: none lost (+), none doubled (-), nobody extra."""
    missing = sorted(u for u in expected if got.get(u) is None)
    extra = sorted(u for u, view in got.items() if view is not None and u not in expected)
    lost = {
        u: expected[u].events - got[u]["events"]
        for u in expected
        if got.get(u) and got[u]["events"] != expected[u].events
    }
    assert not missing and not lost and not extra, (
        f"profiles missing: {missing}; events lost (+) or doubled (-) by user: {lost}; "
        f"users that should not exist: {extra}"
    )
    for user, profile in expected.items():
        counters = {a: n for a, n in zip(rules.actions, profile.counts, strict=True) if n}
        seen = (profile.first_seen, profile.last_seen)
        assert got[user]["counters"] == counters, (user, got[user]["counters"], counters)
        assert (got[user]["first_seen"], got[user]["last_seen"]) == seen, user


def test_up_on_cassandra_puts_every_component_there_and_scales_under_load(node, stack):
    env, url, name, api = stack
    data_dir = Path(env["PERSONA_DATA_DIR"])
    report: dict = {}
    started = time.monotonic()
    succeeded(persona(env, "up", "--store", url))
    report["up_s"] = round(time.monotonic() - started, 1)
    sid = json.loads((data_dir / "up.json").read_text())["sid"]

    status = json.loads(succeeded(persona(env, "status")))
    assert (status["stack"], status["store"]) == ("running", url), status
    assert status["api_ready"]["status"] == "ready", status

    load = Load(api)
    with keyspace(node, name) as cql:
        # The shards, the ingress and the catalog are on the keyspace; nothing made the
        # default SQLite store.
        assert cql.execute("SELECT value FROM meta WHERE key = 'partitions'").one().value == str(
            PARTITIONS
        )
        assert shard_loads(owners(cql)) == {"persona-shard-0": 12, "persona-shard-1": 12}
        items = [{"item_id": f"item-{n}", "topics": [f"topic-{n % 7}"]} for n in range(50)]
        put = httpx.put(f"{api}/v1/items", json={"items": items}, timeout=60)
        assert put.status_code == 200, put.text
        stored = {r.item_id for r in cql.execute("SELECT item_id FROM items")}
        assert stored == {item["item_id"] for item in items}
        assert httpx.get(f"{api}/v1/items/item-3", timeout=30).json()["topics"] == ["topic-3"]
        assert not (data_dir / "persona.db").exists(), "a component opened the default store"

        ready = httpx.get(f"{api}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["store"] == "ok", ready.json()
        assert set(ready.json()["shards"]) == set(shard_loads(owners(cql))), ready.json()

        # Scale out and in while clients post.
        probes: list[list[dict]] = []
        try:
            load.start()
            load.wait_for(10)
            report["out"] = scale(env, 4, cql, load)
            probes.append(write_to_every_partition(api, "after scale-out"))
            load.wait_for(10)
            report["in"] = scale(env, 3, cql, load)
            probes.append(write_to_every_partition(api, "after scale-in"))
            load.wait_for(10)
        finally:
            load.finish()
        assert not load.problems, load.problems
        # Blocks nothing: no batch hung until the fleet gave up re-routing it.
        assert not [r for r in load.refusals if r[1] == "partition_moving"], load.refusals
        assert load.dropped == 0, load.dropped
        report.update(
            batches=len(load.acked), refusals={str(k): v for k, v in load.refusals.items()}
        )

        status = json.loads(succeeded(persona(env, "status")))
        assert isinstance(status["shards"], list), status
        assert sorted(s["name"] for s in status["shards"]) == [
            f"persona-shard-{i}" for i in range(3)
        ], status["shards"]
        assert status["api_ready"]["status"] == "ready", status

        # Loses and doubles nothing: every profile read over HTTP is what the acknowledged
        # batches make, and so, after a checkpoint, is every profile in the keyspace.
        settings = load_settings()
        rules = ProfileRules.from_settings(settings)
        expected = reference_profiles(settings, [*load.acked, *probes])
        users = sorted({f"user-{n}" for n in range(USERS)} | set(expected))
        assert_counts_match(read_profiles(api, users), expected, rules)
        succeeded(persona(env, "checkpoint"))
        in_keyspace = {
            r.user_id: Profile.from_record(codec.decode(r.blob), rules).events
            for r in cql.execute("SELECT user_id, blob FROM profiles")
        }
        want = {user: profile.events for user, profile in expected.items()}
        off = {
            u: (in_keyspace.get(u), want.get(u))
            for u in set(want) | set(in_keyspace)
            if in_keyspace.get(u) != want.get(u)
        }
        assert not off, f"events stored vs acknowledged, by user: {dict(list(off.items())[:20])}"

    # Readiness follows the node: stopped, /readyz answers 503 naming the store.
    node.stop()
    down_ready = httpx.get(f"{api}/readyz", timeout=60)
    assert down_ready.status_code == 503, down_ready.text
    assert down_ready.json()["store"].startswith("down"), down_ready.json()

    # `persona down` stops the whole stack even with its store gone.
    succeeded(persona(env, "down"))
    assert session_members(sid) == []
    report["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))
