"""cluster.yaml and the KubeRay manifest: Ray's own validation, and node autoscaling proven
locally with Ray's real autoscaler on the fake_multinode provider."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from persona.settings import PROJECT_ROOT, load_settings
from tests.ray_heads import Head, free_port

CLUSTER = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
SERVE = yaml.safe_load((PROJECT_ROOT / "serve.yaml").read_text())
SHARD_RESOURCE = next(iter(load_settings().shard_resources))


def test_cluster_yaml_passes_rays_offline_validation():
    config = prepare_config(copy.deepcopy(CLUSTER))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def test_bad_head_type_is_refused_by_the_same_validation():
    broken = copy.deepcopy(CLUSTER)
    broken["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_node_types_provide_what_shards_and_replicas_ask_for():
    types = CLUSTER["available_node_types"]
    head = types[CLUSTER["head_node_type"]]["resources"]
    assert head.get(SHARD_RESOURCE, 0) == 0, "shards belong on workers"
    shard_nodes = [t for t in types.values() if t["resources"].get(SHARD_RESOURCE, 0) >= 1]
    assert shard_nodes and all(t["max_workers"] >= t.get("min_workers", 0) for t in shard_nodes)
    replica_cpus = max(
        d["ray_actor_options"]["num_cpus"] for d in SERVE["applications"][0]["deployments"]
    )
    assert any(t["resources"]["CPU"] >= replica_cpus for t in types.values())
    assert CLUSTER["idle_timeout_minutes"] > 0 and CLUSTER["upscaling_speed"] > 0


def test_kuberay_manifest_mirrors_serve_yaml_and_autoscales():
    manifest = yaml.safe_load((PROJECT_ROOT / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["applications"] == SERVE["applications"]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    shard_resources = json.loads(json.loads(groups["shard-workers"]["rayStartParams"]["resources"]))
    assert shard_resources[SHARD_RESOURCE] >= 1
    assert groups["shard-workers"]["maxReplicas"] > groups["shard-workers"]["minReplicas"]


def fake_multinode_config(gcs_address: str) -> dict:
    """cluster.yaml's node types, scaled down to this machine, on the fake provider."""
    head_type = CLUSTER["head_node_type"]
    node_types = {head_type: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}}
    for name, spec in CLUSTER["available_node_types"].items():
        if name == head_type:
            continue
        node_types[name] = {
            "resources": {
                "CPU": 1,
                SHARD_RESOURCE: min(2, spec["resources"].get(SHARD_RESOURCE, 0)),
            },
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,
        }
    return {
        "cluster_name": "persona-fake",
        "max_workers": 4,
        "upscaling_speed": CLUSTER["upscaling_speed"],
        "idle_timeout_minutes": 0.2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Worker raylets join the head here (the provider assumes port 6379 otherwise).
            "gcs_address": gcs_address,
        },
        "auth": {},
        "docker": {},
        "available_node_types": node_types,
        "head_node_type": head_type,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


AUTOSCALE_DRIVER = textwrap.dedent(
    """
    import json, time, ray
    from actors.fleet import Fleet
    from persona.settings import load_settings

    settings = load_settings(store_url="sqlite:///{db}", namespace="autoscale", partitions=16,
                             shards=3, checkpoint_interval_s=3600)
    ray.init(address="auto", namespace="autoscale", logging_level="error")
    head = ray.get_runtime_context().get_node_id()
    started = time.monotonic()
    fleet = Fleet.start(settings)          # blocks until every shard answers
    up_s = time.monotonic() - started
    nodes_at_peak = sum(n["Alive"] for n in ray.nodes())
    placed = sorted({{ray.get(s.node_id.remote()) for s in fleet.shards.values()}})
    ack = fleet.apply("b1", [{{"user_id": f"u{{i}}", "item_id": "x", "action": "view",
                               "ts": time.time()}} for i in range(50)])
    served = len(fleet.get_profiles([f"u{{i}}" for i in range(50)]))
    fleet.shutdown()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(n["Alive"] for n in ray.nodes()) > 1:
        time.sleep(1)
    print(json.dumps({{"up_s": up_s, "nodes_at_peak": nodes_at_peak, "head": head,
                      "placed": placed, "applied": ack["applied"], "served": served,
                      "nodes_after_idle": sum(n["Alive"] for n in ray.nodes())}}))
    """
)


def test_real_autoscaler_adds_workers_for_shards_and_removes_them_when_idle(tmp_path):
    from ray._private.services import get_node_ip_address

    port = free_port()
    config_file = tmp_path / "fake-cluster.json"
    config_file.write_text(json.dumps(fake_multinode_config(f"{get_node_ip_address()}:{port}")))
    head = Head(
        env={"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"},
        extra=[f"--autoscaling-config={config_file}", "--num-cpus=1"],
        port=port,
    )
    try:
        result = head.run_python(AUTOSCALE_DRIVER.format(db=Path(tmp_path) / "p.db"), timeout=240)
    finally:
        head.stop()
    # 3 shards needing one persona_shard each; the head offers none; workers offer 2.
    assert result["nodes_at_peak"] >= 3
    assert result["head"] not in result["placed"] and len(result["placed"]) == 2
    assert result["applied"] == 50 and result["served"] == 50
    assert result["nodes_after_idle"] == 1
