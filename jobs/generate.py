"""Generate a reproducible synthetic engagement log that looks like a real one.

    python -m jobs.generate --users 2000 --items 1000 --events 100000 --out data/demo [--seed 7]

Writes ``items.jsonl`` (catalog: topics, embeddings clustered by topic, creation
time) and ``events.jsonl`` (time-ordered). Users have a few latent interests
that drift over time; item popularity is Zipf-distributed within each topic;
events come in sessions in which one item often leads to a related one; most
actions are views, fewer clicks and saves, some hides of off-interest items.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DAY = 86_400.0
ACTIONS = np.array(["view", "click", "save", "like", "share"])
ACTION_P = np.array([0.70, 0.18, 0.06, 0.04, 0.02])


def generate(
    out: Path,
    *,
    users: int,
    items: int,
    events: int,
    topics: int = 24,
    days: float = 30.0,
    dim: int = 16,
    seed: int = 7,
    end: float | None = None,
) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    end = float(end if end is not None else int(time.time() // 3600 * 3600))
    start = end - days * DAY
    topic_names = [f"topic-{t:02d}" for t in range(topics)]
    centres = rng.normal(size=(topics, dim))
    item_topic = rng.integers(0, topics, size=items)
    vectors = centres[item_topic] + 0.35 * rng.normal(size=(items, dim))
    created = start - rng.uniform(0, 60 * DAY, size=items)
    with (out / "items.jsonl").open("w") as f:
        for i in range(items):
            second = (item_topic[i] + 1 + rng.integers(0, topics - 1)) % topics
            tags = [topic_names[item_topic[i]]] + (
                [topic_names[second]] if rng.random() < 0.3 else []
            )
            f.write(
                json.dumps(
                    {
                        "item_id": f"item-{i:06d}",
                        "topics": tags,
                        "embedding": [round(float(x), 4) for x in vectors[i]],
                        "created_at": float(created[i]),
                    }
                )
                + "\n"
            )
    # Zipf popularity within each topic.
    by_topic = [np.flatnonzero(item_topic == t) for t in range(topics)]
    stocked = [t for t, members in enumerate(by_topic) if len(members)]
    popularity = []
    for members in by_topic:
        ranks = rng.permutation(len(members)) + 1
        weights = 1.0 / ranks**1.1
        popularity.append(weights / weights.sum())
    # Each user: 2-4 latent interests with weights; one interest drifts mid-way.
    interests = [rng.choice(topics, size=rng.integers(2, 5), replace=False) for _ in range(users)]
    drift_to = rng.integers(0, topics, size=users)
    drift_at = rng.uniform(start, end, size=users)
    activity = rng.pareto(1.5, size=users) + 1
    activity /= activity.sum()
    per_user = rng.multinomial(events, activity)
    rows = []
    for user in range(users):
        remaining = int(per_user[user])
        while remaining > 0:
            session_start = rng.uniform(start, end)
            length = min(remaining, int(rng.integers(1, 12)))
            ts = session_start
            liked = interests[user]
            if session_start > drift_at[user]:
                liked = np.append(liked[1:], drift_to[user])
            topic = int(rng.choice(liked))
            previous = None
            for _ in range(length):
                off_interest = rng.random() < 0.08
                if off_interest:
                    topic_now = int(rng.integers(0, topics))
                else:
                    topic_now = topic if rng.random() < 0.8 else int(rng.choice(liked))
                if not len(by_topic[topic_now]):
                    # A small catalog leaves some topics without items: the event goes
                    # to one that has some (asked for N events, the log has N).
                    topic_now = int(rng.choice(stocked))
                members = by_topic[topic_now]
                if previous is not None and rng.random() < 0.35:
                    # Sessions chain related items: a neighbour of the previous one.
                    near = members[np.argsort(np.abs(members - previous))[:5]]
                    item = int(rng.choice(near))
                else:
                    item = int(rng.choice(members, p=popularity[topic_now]))
                action = (
                    "hide"
                    if off_interest and rng.random() < 0.5
                    else str(rng.choice(ACTIONS, p=ACTION_P))
                )
                rows.append((ts, user, item, action, topic_now))
                previous = item
                ts += float(rng.exponential(90.0))
            remaining -= length
    rows.sort()
    with (out / "events.jsonl").open("w") as f:
        for ts, user, item, action, topic in rows:
            f.write(
                json.dumps(
                    {
                        "user_id": f"user-{user:06d}",
                        "item_id": f"item-{item:06d}",
                        "action": action,
                        "ts": round(min(ts, end), 3),
                        "topics": [topic_names[topic]],
                    }
                )
                + "\n"
            )
    return {"items": items, "users": users, "events": len(rows), "dir": str(out)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=24)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("data/generated"))
    args = parser.parse_args(argv)
    summary = generate(
        args.out,
        users=args.users,
        items=args.items,
        events=args.events,
        topics=args.topics,
        days=args.days,
        seed=args.seed,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
