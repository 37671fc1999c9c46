"""`persona up` / `down` / `status` as an operator runs them: real processes, judged by the
process table and the ports, not by what the commands say about themselves."""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest

from jobs.local import port_holder, session_members
from persona.settings import PROJECT_ROOT
from tests.ray_heads import STACK_PORTS, free_port, persona
from tests.ray_heads import stack_env as make_stack_env


@pytest.fixture
def stack_env(tmp_path):
    env = make_stack_env(tmp_path, PERSONA_PARTITIONS=16)
    yield env, {name: int(env[name]) for name in STACK_PORTS}
    # Whatever a failing test left: the recorded session is stopped.
    persona(env, "down")


def recorded(env: dict) -> dict:
    return json.loads((PROJECT_ROOT / env["PERSONA_DATA_DIR"] / "up.json").read_text())


def test_up_and_down_three_times_leave_nothing_behind(stack_env):
    env, ports = stack_env
    for round_ in range(3):
        started = persona(env, "up")
        assert started.returncode == 0, started.stdout + started.stderr
        sid = recorded(env)["sid"]
        assert len(session_members(sid)) > 3  # the head, its agents, Serve, HAProxy...
        api = f"http://127.0.0.1:{ports['PERSONA_HTTP_PORT']}"
        event = {"user_id": f"ann-{round_}", "item_id": "x", "action": "click", "ts": 1.7e9}
        posted = httpx.post(f"{api}/v1/events", json=[event], timeout=60)
        assert posted.status_code == 200, posted.text
        assert httpx.get(f"{api}/v1/users/ann-{round_}/profile", timeout=60).status_code == 200
        status = persona(env, "status")
        assert status.returncode == 0 and '"stack": "running"' in status.stdout
        stopped = persona(env, "down")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert session_members(sid) == []
        assert {name: port_holder(port) for name, port in ports.items()} == dict.fromkeys(ports)
        assert not (PROJECT_ROOT / env["PERSONA_DATA_DIR"] / "up.json").exists()


def test_up_refuses_a_port_someone_holds_and_names_them(stack_env):
    env, ports = stack_env
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["PERSONA_HTTP_PORT"]))
        squatter.listen()
        refused = persona(env, "up")
    assert refused.returncode != 0
    assert f"port {ports['PERSONA_HTTP_PORT']}, held by pid {os.getpid()}" in refused.stderr
    assert not (PROJECT_ROOT / env["PERSONA_DATA_DIR"] / "up.json").exists()


def test_a_failed_up_stops_what_it_started(stack_env):
    env, ports = stack_env
    # A store that cannot be reached: the head starts, then the fleet cannot.
    env = {**env, "PERSONA_STORE_URL": f"cassandra://127.0.0.1:{free_port()}/nowhere?timeout=2"}
    failed = persona(env, "up")
    assert failed.returncode != 0
    assert "persona up failed, and what it started is stopped again" in failed.stderr
    assert {name: port_holder(port) for name, port in ports.items()} == dict.fromkeys(ports)
    assert not (PROJECT_ROOT / env["PERSONA_DATA_DIR"] / "up.json").exists()
    again = persona({**env, "PERSONA_STORE_URL": ""}, "up")
    assert again.returncode == 0, again.stdout + again.stderr
