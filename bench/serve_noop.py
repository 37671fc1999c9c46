"""The peer baseline for reads under Ray Serve: the plain-uvicorn ceiling's route (a
FastAPI dict lookup, bench/uvicorn_ceiling.py) served by a Serve deployment, so the
same proxy, replicas and request path as Persona's ingress, and none of its work.

bench.http_bench deploys it next to Persona in the same run:
    serve.run(serve_noop.app(users, replicas), name="noop", route_prefix="/")
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from ray import serve

api = FastAPI()


# Persona's ingress options (serving/app.py): the same concurrency, no access log.
@serve.deployment(
    name="NoOp", max_ongoing_requests=256, logging_config={"enable_access_log": False}
)
@serve.ingress(api)
class NoOp:
    def __init__(self, users: int):
        self.profiles = {
            f"user-{n}": {"user_id": f"user-{n}", "counters": {"view": n % 50}}
            for n in range(users)
        }

    @api.get("/v1/users/{user_id}/profile")
    async def profile(self, user_id: str) -> dict:
        found = self.profiles.get(user_id)
        if found is None:
            raise HTTPException(404)
        return found


def app(users: int, replicas: int):
    """The application, with as many replicas as Persona's ingress gets."""
    return NoOp.options(num_replicas=replicas).bind(users)
