"""The peer baseline for reads: plain uvicorn + FastAPI answering a dict lookup.

python -m bench.uvicorn_ceiling --port 8101 --users 100000
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, HTTPException

app = FastAPI()
PROFILES: dict[str, dict] = {}


@app.get("/v1/users/{user_id}/profile")
async def profile(user_id: str) -> dict:
    found = PROFILES.get(user_id)
    if found is None:
        raise HTTPException(404)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    for n in range(args.users):
        PROFILES[f"user-{n}"] = {"user_id": f"user-{n}", "counters": {"view": n % 50}}
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
