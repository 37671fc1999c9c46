"""Failures: a Cassandra outage during ingestion (the test stops and restarts a node of its
own), and the loss of a Ray node (ray.cluster_utils.Cluster: head plus two workers)."""

from __future__ import annotations

import random
import sys
import textwrap
import time

import httpx
import pytest

from persona.settings import load_settings
from storage.cassandra_local import LocalNode
from tests.conftest import SERVE_PORT, require_cassandra
from tests.ray_heads import free_port
from tests.test_shards import make_batch


@pytest.fixture(scope="module")
def own_cassandra(tmp_path_factory):
    """A second local node that this module may stop and start at will."""
    require_cassandra()  # the jars and Java are there when the main node runs
    settings = load_settings(
        data_dir=str(tmp_path_factory.mktemp("cassandra")),
        cassandra_port=free_port(),
        cassandra_storage_port=free_port(),
    )
    node = LocalNode.from_settings(settings)
    node.start()
    yield node
    node.stop()


def post(client, path, batch, key):
    return client.post(path, json=batch, headers={"Idempotency-Key": key})


def test_cassandra_outage_refuses_writes_keeps_resident_reads_and_recovers(
    ray_session, own_cassandra, tmp_path, connect_fleet
):
    from ray import serve

    from serving.app import build_app
    from tests.test_shards import assert_matches_reference, reference_profiles

    overrides = {
        "store_url": f"cassandra://127.0.0.1:{own_cassandra.native_port}/outage"
        "?replication=1&consistency=ONE&timeout=3",
        "namespace": "persona-outage",
        "partitions": 16,
        "checkpoint_interval_s": 2.0,
        "signals_refresh_s": 1.0,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(build_app(overrides), name="outage", route_prefix="/outage")
    client = httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}/outage", timeout=30)
    rng = random.Random(21)
    batches = [make_batch(rng, 50, users=60) for _ in range(30)]
    try:
        for n, batch in enumerate(batches[:10]):
            assert post(client, "/v1/events", batch, f"out-{n}").status_code == 200
        resident = batches[0][0]["user_id"]
        own_cassandra.stop()
        # Failing fast: a write that hung on the dead store would hit this client timeout.
        refused = client.post(
            "/v1/events", json=batches[10], headers={"Idempotency-Key": "out-10"}, timeout=15
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "store_unavailable"
        # A resident profile is still served whole, from memory.
        served = client.get(f"/v1/users/{resident}/profile")
        assert served.status_code == 200
        assert served.json()["events"] == sum(
            e["user_id"] == resident for batch in batches[:10] for e in batch
        )
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        own_cassandra.start()
        for n in range(10, len(batches)):
            for _attempt in range(60):
                reply = post(client, "/v1/events", batches[n], f"out-{n}")
                if reply.status_code == 200:
                    break
                assert reply.status_code == 503, reply.text
                time.sleep(1.0)
            assert reply.status_code == 200
        settings = load_settings(**overrides)
        fleet = connect_fleet(settings)
        assert_matches_reference(fleet, reference_profiles(settings, batches))
        # Checkpoints resumed by themselves once the node was back (their backoff
        # reaches 30 s between tries, the interval is 2 s: 90 s leaves room for both).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(s["dirty"] for s in fleet.stats()):
            time.sleep(1.0)
        assert not any(s["dirty"] for s in fleet.stats())
        fleet.shutdown()
    finally:
        client.close()
        serve.delete("outage")


NODE_FAILURE_DRIVER = textwrap.dedent(
    """
    import json, random, sys, time
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, {root!r})
    from actors.fleet import Fleet
    from persona.settings import load_settings
    from tests.test_shards import make_batch, reference_profiles, assert_matches_reference

    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1,
                      "resources": {{"persona_shard": 0}}}})
    workers = [cluster.add_node(num_cpus=1, resources={{"persona_shard": 4}}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="node-failure", logging_level="error")
    settings = load_settings(store_url={url!r}, namespace="node-failure", partitions=16,
                             shards=2, checkpoint_interval_s=2.0)
    fleet = Fleet.start(settings)
    placed = {{ray.get(s.node_id.remote()) for s in fleet.shards.values()}}
    rng = random.Random(8)
    batches = [make_batch(rng, 80, users=200) for _ in range(30)]
    retries = 0
    import threading
    for n, batch in enumerate(batches):
        if n == 12:
            # The node goes while batch 12 is in flight on its shard.
            victim = next(w for w in workers if w.node_id in placed)
            outcome = {{}}
            def send():
                try:
                    outcome["ack"] = fleet.apply(f"nf-{{n}}", batch)
                except Exception as exc:
                    outcome["error"] = exc
            sender = threading.Thread(target=send)
            sender.start()
            cluster.remove_node(victim)
            sender.join(300)
        for attempt in range(120):
            try:
                fleet.apply(f"nf-{{n}}", batch)
                break
            except Exception:
                retries += 1
                time.sleep(0.5)
    assert_matches_reference(fleet, reference_profiles(settings, batches))
    after = {{ray.get(s.node_id.remote()) for s in fleet.shards.values()}}
    print(json.dumps({{"placed": sorted(placed), "after": sorted(after), "retries": retries,
                      "victim": victim.node_id}}))
    fleet.shutdown()
    fleet.store.close()  # no driver threads left to run Python while Ray shuts down
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_losing_a_node_restarts_its_shards_elsewhere_and_loses_nothing(tmp_path):
    import json
    import os
    import subprocess
    import uuid

    from persona.settings import PROJECT_ROOT
    from tests.conftest import cassandra_url

    require_cassandra()
    url = cassandra_url(f"persona_nf_{uuid.uuid4().hex[:8]}", consistency="LOCAL_QUORUM")
    code = NODE_FAILURE_DRIVER.format(root=str(PROJECT_ROOT), url=url)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    outcome = json.loads([s for s in result.stdout.splitlines() if s.startswith("{")][-1])
    # Shards were spread over both workers; the victim's shard now runs on the survivor.
    assert len(outcome["placed"]) == 2
    assert outcome["victim"] not in outcome["after"]
