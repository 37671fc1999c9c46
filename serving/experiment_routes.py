"""The experiment routes of the Ingress: list experiments, read one's results, change
the running one. Results are computed from the store (exposures and attributions,
serving.experiments.report) in a worker thread; changes are recorded in the store's
experiment log with the token name that made them, and replicas pick them up on
their next refresh (PERSONA_SIGNALS_REFRESH_S)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from actors.events import check_id
from persona.errors import ConfigError, VersionConflict
from serving import experiments, schemas
from serving.auth import client_scope
from serving.views import ApiError

router = APIRouter()

# Metric labels of these routes (serving.app.ENDPOINTS).
ENDPOINTS = {
    "list_experiments": "experiments",
    "get_experiment": "experiment",
    "put_experiment": "experiment_put",
}


class ExperimentRoutes:
    """Routes of the Ingress (it inherits this class; Serve binds ``self`` to the
    replica). Reads need what profile reads need; a change needs ``admin``."""

    @router.get("/v1/experiments", tags=["experiments"])
    async def list_experiments(self, authorization: str | None = Header(None)) -> dict:
        """Every experiment the log holds: its shares, whether it runs, when it started."""
        self.tokens.authorize(authorization, self.read_role)
        rows = await asyncio.to_thread(experiments.listing, self.store, self.settings.experiments)
        return {"experiments": rows}

    @router.get(
        "/v1/experiments/{name}",
        responses={404: {"model": schemas.ErrorBody, "description": "unknown experiment"}},
        tags=["experiments"],
    )
    async def get_experiment(
        self, name: str, points: int = 0, authorization: str | None = Header(None)
    ) -> JSONResponse:
        """Per variant: users, exposures, clicks/saves/hides per exposure and the
        per-user engagement rate with 95% intervals, and each variant against the
        control with an always-valid (sequential) test; ``points`` > 0 adds the
        rate over time. Computed from the stored exposures and attributions: events
        are counted once their shard has checkpointed them."""
        self.tokens.authorize(authorization, self.read_role)
        if not 0 <= points <= 200:
            raise ApiError(422, "invalid_request", "points must be in [0, 200]")
        try:
            body = await asyncio.to_thread(
                experiments.report, self.store, self.settings.experiments, name, None, points
            )
        except KeyError as exc:
            raise ApiError(404, "unknown_experiment", f"no experiment {name!r}") from exc
        return JSONResponse(body)

    @router.put("/v1/experiments/{name}", tags=["experiments"])
    async def put_experiment(
        self, name: str, request: Request, authorization: str | None = Header(None)
    ) -> dict:
        """Change the running experiment, or start another (a new name):
        ``{"variants": {"control": {"share": 50}, "b": {"share": 50, "blend": {...}}},
        "control"?, "salt"?}``. Users keep their buckets where the shares allow; the
        change is recorded with the token's name."""
        caller = self.tokens.authorize(authorization, "admin")
        problem = check_id(name, "experiment")
        if problem:
            raise ApiError(422, "invalid_id", problem)
        body = await request.json()
        variants = body.get("variants") if isinstance(body, dict) else None
        if not isinstance(variants, dict) or not variants:
            raise ApiError(422, "invalid_experiment", 'send {"variants": {name: {"share": N}}}')
        try:
            shares = {v: float(spec["share"]) for v, spec in variants.items()}
            blends = {v: spec["blend"] for v, spec in variants.items() if "blend" in spec}
            change = await asyncio.to_thread(
                experiments.apply_change,
                self.store,
                self.settings.experiments,
                client_scope(caller),
                shares=shares,
                blends=blends,
                name=name,
                salt=body.get("salt"),
                control=body.get("control"),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ApiError(422, "invalid_experiment", str(exc)) from exc
        except VersionConflict as exc:
            raise ApiError(409, "concurrent_change", f"{exc}; read it again and retry") from exc
        # This replica serves it from the next request; the others on their next refresh.
        self.recommender.experiment = change.experiment
        return {
            "seq": change.seq,
            "what": change.what,
            "by": change.by,
            "experiment": change.experiment.to_dict(),
        }
