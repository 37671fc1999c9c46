"""What every job shares: settings, joining Ray in Persona's namespace, finding the fleet."""

from __future__ import annotations

import os
import socket

import ray

from actors.fleet import Fleet
from persona.errors import ConfigError
from persona.settings import Settings, load_settings


def join_ray(settings: Settings, *, join_local_head: bool = True) -> None:
    """Join the running cluster (a `ray job submit` or RAY_ADDRESS, the stack `persona
    up` recorded, or a local head), or start a local Ray when there is none, always
    in Persona's namespace so the detached shards are visible. With
    ``join_local_head=False`` a head some other `ray start` left on this machine is not
    joined (the demo runs on a Ray of its own, not in whatever cluster it finds)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from jobs.local import local_resources, read_stack

    stack = read_stack(settings)
    if not os.environ.get("RAY_ADDRESS") and stack is not None:
        from jobs.local import connect

        connect(stack["ray_address"], settings.namespace)
        return
    address = os.environ.get("RAY_ADDRESS")
    if address or (join_local_head and _local_cluster_running()):
        ray.init(address=address or "auto", namespace=settings.namespace, logging_level="warning")
    else:
        ray.init(
            address="local",
            namespace=settings.namespace,
            include_dashboard=False,
            logging_level="warning",
            resources=local_resources(),
        )


def _local_cluster_running() -> bool:
    """A `ray start` head on this machine that answers (its address file can outlive it)."""
    try:
        from ray._private.services import find_bootstrap_address

        address = find_bootstrap_address(None)
    except Exception:  # no local cluster, or Ray's private helper moved
        return False
    if not address:
        return False
    host, _, port = address.rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, int(port))) == 0


def settings_for_command(**overrides) -> Settings:
    """The settings a command acts with: those of the stack `persona up` recorded (so
    `scale`, `ingest`, `checkpoint` and `export` act on that stack's store), or the
    PERSONA_* environment when no stack runs. A --store that names another store
    than the running stack's is refused rather than silently acted on."""
    from jobs.local import read_stack, session_members, stack_settings

    settings = load_settings(**overrides)
    stack = read_stack(settings)
    if stack is None or not session_members(stack["sid"]):
        return settings
    running = stack_settings(stack, settings.api_token)
    asked = overrides.get("store_url")
    if asked and asked != running.store_url and asked != running.resolved_store_url():
        raise ConfigError(
            f"the running stack uses {running.resolved_store_url()}, not {asked}: "
            "drop --store, or `persona down` and `persona up --store ...`"
        )
    return running


def fleet_for_job(settings: Settings | None = None, *, join_local_head: bool = True) -> Fleet:
    """The running fleet, or a new one (idempotent) when none is up yet."""
    settings = settings or settings_for_command()
    join_ray(settings, join_local_head=join_local_head)
    return Fleet.start(settings)
