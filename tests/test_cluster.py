"""cluster.yaml and the KubeRay manifest: Ray's own validation, and node autoscaling proven
locally with Ray's real autoscaler on the fake_multinode provider."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from persona.errors import ConfigError
from persona.settings import PROJECT_ROOT, load_settings
from serving.auth import access_tokens, refuse_open_exposure
from tests.ray_heads import Head, free_port

CLUSTER = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
SERVE = yaml.safe_load((PROJECT_ROOT / "serve.yaml").read_text())
SHARD_RESOURCE = next(iter(load_settings().shard_resources))


def test_cluster_yaml_passes_rays_offline_validation():
    config = prepare_config(copy.deepcopy(CLUSTER))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def start_exports(commands: list[str]) -> dict[str, str]:
    """The variables a node's start commands export, as bash would see them on the node."""
    exports = {}
    for command in commands:
        for assignment in re.findall(r"export ([^;]+);", command):
            for pair in assignment.split():
                name, _, value = pair.partition("=")
                exports[name] = value.strip("'\"")
    return exports


def test_every_node_starts_with_the_same_settings_file_and_it_is_secure_by_default(tmp_path):
    head = start_exports(CLUSTER["head_start_ray_commands"])
    worker = start_exports(CLUSTER["worker_start_ray_commands"])
    persona_vars = {k: v for k, v in head.items() if k.startswith("PERSONA_")}
    # Replicas, shards and jobs run on any node: they must read the same settings.
    assert persona_vars == {k: v for k, v in worker.items() if k.startswith("PERSONA_")}
    assert set(persona_vars) == {"PERSONA_CONFIG"}
    # The file is on the node because file_mounts copies the project there.
    remote_root, local_root = next(iter(CLUSTER["file_mounts"].items()))
    remote = persona_vars["PERSONA_CONFIG"]
    assert remote.startswith(remote_root + "/") and local_root == "."
    shipped = PROJECT_ROOT / remote.removeprefix(remote_root + "/")
    settings = load_settings(env={"PERSONA_CONFIG": str(shipped)})
    assert settings.store_url.startswith("cassandra://") and settings.bind_host == "0.0.0.0"
    # As shipped, the app refuses to start: the token entry is a placeholder...
    with pytest.raises(ConfigError, match="ops"):
        access_tokens(settings)
    # ...and once the operator writes a digest there, it starts on 0.0.0.0.
    filled = yaml.safe_load(shipped.read_text())
    filled["api_tokens"]["ops"]["sha256"] = hashlib.sha256(b"a-real-token").hexdigest()
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(filled))
    settings = load_settings(env={"PERSONA_CONFIG": str(tmp_path / "settings.yaml")})
    refuse_open_exposure(settings, access_tokens(settings))
    # With no token at all it would refuse too: 0.0.0.0 is not loopback.
    with pytest.raises(ConfigError):
        refuse_open_exposure(dataclasses.replace(settings, api_tokens={}), {})


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


# cluster.yaml's idle timeout is minutes; the test waits 12 s. Nothing else changes.
FAKE_IDLE_TIMEOUT_MINUTES = 0.2


def fake_multinode_config(gcs_address: str) -> dict:
    """cluster.yaml itself on Ray's fake_multinode provider: the same node types with the
    same resources, min_workers and max_workers, the same ceiling and upscaling speed.
    Replaced: what needs a cloud (provider, node_config, auth, file mounts, setup and
    start commands) and the idle timeout (FAKE_IDLE_TIMEOUT_MINUTES). Fake nodes are
    raylets on this machine that advertise their node type's logical resources."""
    config = copy.deepcopy(CLUSTER)
    for spec in config["available_node_types"].values():
        spec["node_config"] = {}
    config["available_node_types"][config["head_node_type"]]["max_workers"] = 0
    config.update(
        cluster_name="persona-fake",
        idle_timeout_minutes=FAKE_IDLE_TIMEOUT_MINUTES,
        provider={
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Worker raylets join the head here (the provider assumes port 6379 otherwise).
            "gcs_address": gcs_address,
        },
        auth={},
        docker={},
        file_mounts={},
        cluster_synced_files=[],
        file_mounts_sync_continuously=False,
        rsync_exclude=[],
        rsync_filter=[],
        initialization_commands=[],
        setup_commands=[],
        head_setup_commands=[],
        worker_setup_commands=[],
        head_start_ray_commands=[],
        worker_start_ray_commands=[],
    )
    return config


def serve_config_for_this_machine(http_port: int) -> dict:
    """serve.yaml with its application and deployment options as they are; only the HTTP
    address is this machine's loopback (no token to hand around in a test) and the gRPC
    port a free one."""
    config = copy.deepcopy(SERVE)
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["grpc_options"]["port"] = free_port()
    config["applications"][0]["args"]["bind_host"] = "127.0.0.1"
    return config


# Waits for the shards the app's builder started, writes through them, then takes the
# app and the shards down and waits for the autoscaler to remove idle workers.
AUTOSCALE_DRIVER = textwrap.dedent(
    """
    import json, time, ray
    import ray.util.state
    from ray import serve
    from actors.fleet import Fleet
    from persona.settings import load_settings

    settings = load_settings()
    ray.init(address="auto", namespace=settings.namespace, logging_level="error")
    head = ray.get_runtime_context().get_node_id()
    fleet = Fleet.connect(settings)
    placed = [ray.get(s.node_id.remote()) for s in fleet.shards.values()]
    replicas = [a["node_id"] for a in ray.util.state.list_actors(
        filters=[("class_name", "=", "ServeReplica:persona:Ingress"), ("state", "=", "ALIVE")])]
    nodes_at_peak = sum(n["Alive"] for n in ray.nodes())
    serve.shutdown()
    fleet.shutdown()
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and sum(n["Alive"] for n in ray.nodes()) > {expected_idle}:
        time.sleep(1)
    time.sleep(15)   # longer than the idle timeout: nothing more may go
    print(json.dumps({{"nodes_at_peak": nodes_at_peak, "head": head, "placed": placed,
                      "replicas": replicas,
                      "nodes_after_idle": sum(n["Alive"] for n in ray.nodes())}}))
    """
)


def test_real_autoscaler_brings_up_cluster_yaml_workers_for_the_app_and_keeps_min_workers(
    tmp_path,
):
    """Serve deploys serve.yaml's application on cluster.yaml's node types: the app's
    builder starts more shards than the minimum worker set offers `persona_shard`, the
    autoscaler adds shard workers, the app serves over HTTP; when the app and shards are
    gone the workers above min_workers leave and the min_workers ones stay."""
    import httpx
    from ray._private.services import get_node_ip_address

    node_types = CLUSTER["available_node_types"]
    head_type = node_types[CLUSTER["head_node_type"]]
    per_worker = node_types["shard.worker"]["resources"][SHARD_RESOURCE]
    min_workers = sum(t.get("min_workers", 0) for t in node_types.values())
    shards = per_worker * node_types["shard.worker"]["min_workers"] + 1  # one more than fits
    port = free_port()
    http_port = free_port()
    config_file = tmp_path / "fake-cluster.json"
    config_file.write_text(json.dumps(fake_multinode_config(f"{get_node_ip_address()}:{port}")))
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(yaml.safe_dump(serve_config_for_this_machine(http_port)))
    settings_env = {
        # What deploy/cluster-settings.yaml gives every node, for this machine.
        "PERSONA_STORE_URL": f"sqlite:///{tmp_path / 'p.db'}",
        "PERSONA_NAMESPACE": "autoscale",
        "PERSONA_PARTITIONS": "16",
        "PERSONA_SHARDS": str(shards),
        "PERSONA_CHECKPOINT_INTERVAL_S": "3600",
    }
    head = Head(
        dashboard=True,
        env={
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            # Fake nodes advertise 8 CPUs each on a 2-core machine: start workers on demand.
            "RAY_prestart_worker_first_driver": "0",
            **settings_env,
        },
        extra=[
            f"--autoscaling-config={config_file}",
            f"--num-cpus={head_type['resources']['CPU']}",
        ],
        port=port,
    )
    try:
        deployed = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.serve.scripts",
                "deploy",
                str(serve_file),
                "--address",
                head.dashboard,
            ],
            env=head.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 300
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, "the app never became ready"
        events = [
            {"user_id": f"u{i}", "item_id": "x", "action": "view", "ts": time.time()}
            for i in range(50)
        ]
        ack = httpx.post(f"{base}/v1/events", json=events, timeout=60).json()
        assert ack["applied"] == 50
        assert httpx.get(f"{base}/v1/users/u7/profile", timeout=30).json()["events"] == 1
        result = head.run_python(
            AUTOSCALE_DRIVER.format(expected_idle=1 + min_workers), timeout=300
        )
    finally:
        head.stop()
    assert result["head"] not in result["placed"], "shards belong on workers"
    assert len(set(result["placed"])) == 2 and len(result["placed"]) == shards
    assert result["replicas"], "serve.yaml's replica runs somewhere in the cluster"
    assert result["nodes_at_peak"] >= 1 + 2
    # Workers above min_workers leave; the min_workers ones stay.
    assert result["nodes_after_idle"] == 1 + min_workers
