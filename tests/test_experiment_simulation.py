"""Experiments end to end (issue #14): a real `persona up`, real HTTP. Simulated users
with a hidden favourite topic ask for recommendations and click according to it.
An A/A experiment reports no significant difference; an A/B experiment whose variant
ranks the user's topic first reports a significant lift whose interval holds the
simulated truth; and exposures and attributed clicks add up, with no loss and no
double count, across a shard killed in the middle of the A/B run. Seeded; nothing is
timed (waits are for conditions, with generous deadlines).

Set PERSONA_EXPERIMENT_PLOT=docs/experiment.png to write the README's picture."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import httpx

from jobs.local import session_members
from persona.settings import PROJECT_ROOT
from tests.test_lifecycle import persona, stack_env  # noqa: F401 (a fixture)

TOPICS = 10
ITEMS_PER_TOPIC = 20
USERS = 200
ROUNDS = 3
K = 10
P_LIKED, P_OTHER = 0.3, 0.03  # click probability of an item of the user's topic, or not
BLEND_POPULAR = {"popular": 1.0}
AA = {
    "name": "sim-aa",
    "variants": {
        "control": {"share": 50, "blend": BLEND_POPULAR},
        "twin": {"share": 50, "blend": BLEND_POPULAR},
    },
}


def topic_of(item: str) -> int:
    return int(item.split("-")[1])


def favourite(user: str) -> int:
    return int(user.split("-")[1]) % TOPICS


def click_probability(user: str, item: str) -> float:
    return P_LIKED if topic_of(item) == favourite(user) else P_OTHER


class Simulation:
    def __init__(self, client: httpx.Client):
        self.client = client
        # experiment -> rec_id -> (user, variant, expected clicks); clicks sent
        self.shown: dict[str, dict[str, tuple]] = {}
        self.clicks: dict[str, dict[str, int]] = {}

    def send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A request retried while a shard restarts (503), as a client would; a
        retried POST carries the same Idempotency-Key, so it applies once."""
        for _attempt in range(120):
            reply = self.client.request(method, path, **kwargs)
            if reply.status_code != 503:
                reply.raise_for_status()
                return reply
            time.sleep(0.5)
        raise AssertionError(f"{method} {path} kept answering 503: {reply.text}")

    def round(self, experiment: str, n: int, *, with_rec_id=True, after_each=None) -> None:
        rng = random.Random(f"{experiment}-{n}")
        shown, clicks = (
            self.shown.setdefault(experiment, {}),
            self.clicks.setdefault(experiment, {}),
        )
        pending = []
        for u in range(USERS):
            user = f"user-{u:04d}"
            body = self.send("GET", f"/v1/users/{user}/recommendations", params={"k": K}).json()
            assert body["experiment"] == experiment
            items = [i["item_id"] for i in body["items"]]
            expected = sum(click_probability(user, i) for i in items)
            shown[body["rec_id"]] = (user, body["variant"], expected)
            events = []
            for position, item in enumerate(items):
                if rng.random() < click_probability(user, item):
                    event = {
                        "user_id": user,
                        "item_id": item,
                        "action": "click",
                        "ts": time.time(),
                        "topics": [f"topic-{topic_of(item)}"],
                    }
                    if with_rec_id:
                        event.update(rec_id=body["rec_id"], position=position)
                    events.append(event)
            clicks[body["variant"]] = clicks.get(body["variant"], 0) + len(events)
            if events:
                pending.append((f"{experiment}-{n}-{user}", events))
            if with_rec_id:
                self.post(pending)
                pending = []
            if after_each is not None:
                after_each(u)
        if pending:  # clicks that name no rec_id: once the exposures reached the shards
            self.wait_for_exposures(experiment)
            self.post(pending)

    def post(self, batches) -> None:
        for key, events in batches:
            ack = self.send(
                "POST", "/v1/events", json=events, headers={"Idempotency-Key": key}
            ).json()
            assert ack["applied"] + ack["duplicate"] == len(events)

    def report(self, experiment: str, points: int = 0) -> dict:
        return self.send("GET", f"/v1/experiments/{experiment}", params={"points": points}).json()

    def wait_for_exposures(self, experiment: str) -> None:
        """Until every response's exposure is in the store (replicas flush in the
        background); exposures are never dropped at this rate."""
        want = len(self.shown[experiment])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = sum(v["exposures"] for v in self.report(experiment)["variants"].values())
            if got >= want:
                assert got == want  # no exposure twice
                return
            time.sleep(0.5)
        raise AssertionError(f"{experiment}: exposures never reached {want}")

    def truth(self, experiment: str, variant: str, control: str) -> float:
        """The simulated difference of the mean per-user expected click rate."""
        per_user: dict[str, dict[str, list[float]]] = {}
        for user, v, expected in self.shown[experiment].values():
            per_user.setdefault(v, {}).setdefault(user, []).append(expected)

        def mean_rate(v: str) -> float:
            rates = [sum(x) / len(x) for x in per_user[v].values()]
            return sum(rates) / len(rates)

        return mean_rate(variant) - mean_rate(control)


def shard_pids(env: dict) -> list[int]:
    record = json.loads((Path(env["PERSONA_DATA_DIR"]) / "up.json").read_text())
    pids = []
    for pid in session_members(record["sid"]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ProfileShard" in cmdline:
            pids.append(pid)
    return sorted(pids)


def test_simulated_users_aa_is_flat_ab_lift_is_found_and_nothing_is_lost_across_a_shard_kill(
    stack_env,  # noqa: F811
    tmp_path,
):
    env, ports = stack_env
    env = {
        **env,
        "PERSONA_EXPERIMENTS": json.dumps(AA),
        "PERSONA_EXPOSURE_FLUSH_S": "0.3",
        "PERSONA_SIGNALS_REFRESH_S": "1",
        "PERSONA_SHARDS": "2",
    }
    up = persona(env, "up", "--no-haproxy")
    assert up.returncode == 0, up.stderr
    base = f"http://127.0.0.1:{ports['PERSONA_HTTP_PORT']}"
    with httpx.Client(base_url=base, timeout=60) as client:
        sim = Simulation(client)
        items = [
            {"item_id": f"item-{t}-{n:02d}", "topics": [f"topic-{t}"]}
            for t in range(TOPICS)
            for n in range(ITEMS_PER_TOPIC)
        ]
        sim.send("PUT", "/v1/items", json={"items": items})
        # A history: each user viewed five items of their topic; everybody viewed a few
        # items of topic 0, so "popular" mostly shows what most users do not prefer.
        history = []
        now = time.time() - 3600
        for u in range(USERS):
            user = f"user-{u:04d}"
            for n in range(5):
                item = f"item-{favourite(user)}-{(u + n) % ITEMS_PER_TOPIC:02d}"
                history.append(
                    {
                        "user_id": user,
                        "item_id": item,
                        "action": "view",
                        "ts": now,
                        "topics": [f"topic-{favourite(user)}"],
                    }
                )
            for n in range(3):
                history.append(
                    {
                        "user_id": user,
                        "item_id": f"item-0-{n:02d}",
                        "action": "view",
                        "ts": now,
                        "topics": ["topic-0"],
                    }
                )
        sim.send("POST", "/v1/events", json=history, headers={"Idempotency-Key": "history"})

        # --- A/A: two identical variants; the second round's clicks name no rec_id ---
        for n in range(ROUNDS):
            sim.round("sim-aa", n, with_rec_id=(n != 1))

        # --- A/B, started live: the variant ranks the user's own topic first ---
        change = sim.send(
            "PUT",
            "/v1/experiments/sim-ab",
            json={
                "variants": {
                    "control": {"share": 50, "blend": BLEND_POPULAR},
                    "topic-first": {"share": 50, "blend": {"topic": 1.0}},
                }
            },
        ).json()
        assert change["what"].startswith("started experiment sim-ab")
        killed = []

        def kill_a_shard(u: int) -> None:
            if u == USERS // 2 and not killed:
                pid = shard_pids(env)[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        for n in range(ROUNDS):
            sim.round("sim-ab", n, after_each=kill_a_shard if n == 1 else None)
        assert killed and killed[0] not in shard_pids(env)  # Ray restarted it elsewhere

        # Attributions are counted once their shard checkpointed them.
        assert persona(env, "checkpoint").returncode == 0
        reports = {}
        for name in ("sim-aa", "sim-ab"):
            sim.wait_for_exposures(name)
            reports[name] = sim.report(name)
            for variant, row in reports[name]["variants"].items():
                shown = sum(1 for _u, v, _e in sim.shown[name].values() if v == variant)
                assert row["exposures"] == shown, (name, variant)
                assert row["engaged"] == sim.clicks[name].get(variant, 0), (name, variant)
            assert reports[name]["unmatched_attributions"] == 0

        aa = reports["sim-aa"]["variants"]["twin"]["vs_control"]
        assert not aa["significant"], aa
        ab = reports["sim-ab"]["variants"]["topic-first"]["vs_control"]
        truth = sim.truth("sim-ab", "topic-first", "control")
        print(f"A/A {aa}\nA/B {ab}\ntruth {truth:.4f}")
        assert ab["significant"], ab
        assert ab["ci95"][0] <= truth <= ab["ci95"][1], (ab, truth)

        # The CLI prints the table and draws the plot from the same store.
        table = persona(env, "experiments", "sim-ab", "--plot", str(tmp_path / "ab.png"))
        assert table.returncode == 0, table.stderr
        assert "topic-first" in table.stdout and " *" in table.stdout
        assert (tmp_path / "ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        listed = persona(env, "experiments")
        assert "* sim-ab" in listed.stdout and "  sim-aa" in listed.stdout
        exported = persona(env, "exposures", "export", str(tmp_path / "exposures.jsonl"))
        assert exported.returncode == 0, exported.stderr
        lines = (tmp_path / "exposures.jsonl").read_text().splitlines()
        assert len(lines) == len(sim.shown["sim-aa"]) + len(sim.shown["sim-ab"])
        if os.environ.get("PERSONA_EXPERIMENT_PLOT"):
            out = PROJECT_ROOT / os.environ["PERSONA_EXPERIMENT_PLOT"]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes((tmp_path / "ab.png").read_bytes())
    assert persona(env, "down").returncode == 0
