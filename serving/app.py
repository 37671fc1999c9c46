"""The HTTP API: a FastAPI ingress deployed with Ray Serve. Routes are thin: they parse,
call the fleet or the replica's recommender, and map Persona's errors to status codes in one place.

Run it with `serve run serving.app:app` or `serve deploy serve.yaml`; settings come
from PERSONA_* variables of the process that builds the application.
"""

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.catalog import MAX_EMBEDDING_DIM, decode_item, encode_item, item_problem
from actors.events import ALLOWED, MAX_TOPICS, check_id
from actors.fleet import Fleet
from actors.profile import ProfileRules, ProfileView
from persona.errors import (
    ConfigError,
    CorruptRecord,
    InvalidEvents,
    PersonaError,
    ShardUnavailable,
    StaleEpoch,
    StoreUnavailable,
)
from persona.settings import Settings, load_settings
from serving import console, experiment_routes, grpc_ingress, schemas
from serving.auth import (
    TokenTable,
    access_tokens,
    client_scope,
    refuse_open_exposure,
)
from serving.exposures import ExposureLog
from serving.metrics import EventMetrics, ExposureMetrics, RequestMetrics
from serving.recommend import RecommenderCore
from serving.views import (
    DEFAULT_K,
    MAX_K,
    MAX_LOOKUP_IDS,
    MAX_TOPIC_CHARS,
    ApiError,
    BodyLimits,
    decode_json,
    decode_msgpack_records,
    error_body,
    lookup_ids,
    lookup_profiles,
    lookup_view,
    profile_view,
)
from storage import open_store

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
# Bodies larger than this are decoded in a worker thread, so the replica keeps serving.
OFF_LOOP_BYTES = 64 * 1024

api = FastAPI(
    title="Persona",
    version="1",
    description="Live user profiles and recommendations. Errors share one body shape: "
    '`{"error": {"code", "message", "errors"?}}`.',
    # serving.console serves the docs from the package's own files: FastAPI's pages load
    # their scripts from a CDN.
    docs_url=None,
    redoc_url=None,
)
console.install(api)
api.include_router(experiment_routes.router)

ERRORS = {
    400: {"model": schemas.ErrorBody, "description": "malformed request"},
    401: {"model": schemas.ErrorBody, "description": "missing bearer token"},
    403: {"model": schemas.ErrorBody, "description": "unknown token, or its role too low"},
    422: {"model": schemas.ErrorBody, "description": "invalid input; nothing was applied"},
    503: {"model": schemas.ErrorBody, "description": "store or shard unavailable; retry"},
}


# --- errors: one mapping for the whole API ---------------------------------------------
_STATUS = [
    (InvalidEvents, 422, "invalid_events"),
    (StoreUnavailable, 503, "store_unavailable"),
    (StaleEpoch, 503, "partition_moving"),
    (ShardUnavailable, 503, "shard_unavailable"),
    (CorruptRecord, 500, "corrupt_record"),
    (ConfigError, 500, "misconfigured"),
    (PersonaError, 500, "internal"),
]


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, **exc.details), status_code=exc.status)


@api.exception_handler(PersonaError)
async def _persona_error(_request: Request, exc: PersonaError) -> JSONResponse:
    for kind, status, code in _STATUS:
        if isinstance(exc, kind):
            details = {"errors": exc.errors} if isinstance(exc, InvalidEvents) else {}
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse(
                error_body(code, str(exc), **details), status_code=status, headers=headers
            )
    raise exc  # pragma: no cover - PersonaError is the last entry


@api.exception_handler(RequestValidationError)
async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own checks of query parameters and headers, in the API's error shape.
    # Only where and why: the offending input is not echoed back.
    errors = [
        {"field": ".".join(str(part) for part in problem.get("loc", ())), "reason": problem["msg"]}
        for problem in exc.errors()
    ]
    message = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:3])
    return JSONResponse(error_body("invalid_request", message, errors=errors), status_code=422)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # The router's own refusals: no such path (404), no such method on it (405).
    message = f"{request.method} {request.url.path[:200]}: {exc.detail} (the routes are in /docs)"
    return JSONResponse(
        error_body(_HTTP_CODES.get(exc.status_code, "http_error"), message),
        status_code=exc.status_code,
        headers=exc.headers,
    )


@api.exception_handler(Exception)
async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
    # A bug still answers in the one error shape; Starlette logs the traceback.
    return JSONResponse(
        error_body("internal", "an unexpected error; it has been logged"), status_code=500
    )


# The metric label of each route: a fixed name, never the raw path (its user and item ids
# would make one series per id).
ENDPOINTS = {
    "get_profile": "profile",
    "batch_get_profiles": "profiles_lookup",
    "get_recommendations": "recommendations",
    "post_events": "events",
    "delete_user": "delete",
    "put_items": "items_put",
    "get_item": "items_get",
    "healthz": "healthz",
    "readyz": "readyz",
    **console.ENDPOINTS,
    **experiment_routes.ENDPOINTS,
}


def endpoint_label(scope: dict) -> str:
    route = scope.get("route")
    if route is None:
        return "unmatched"
    return ENDPOINTS.get(getattr(route, "name", ""), "other")


api.add_middleware(RequestMetrics, endpoint_of=endpoint_label)


# Module helpers that routes call are defined above Ingress: Serve pickles the routes
# by value when the class is decorated, with the globals that exist at that moment.
def _valid_id(value: str, name: str, *, in_url_path: bool = True) -> str:
    problem = check_id(value, name, in_url_path=in_url_path)
    if problem:
        raise ApiError(422, "invalid_id", problem)
    return value


# Serve's access log writes a line per request (~3% of a replica's CPU on GET profile):
# RequestMetrics counts every request by endpoint and status instead.
@serve.deployment(
    name="Ingress", max_ongoing_requests=256, logging_config={"enable_access_log": False}
)
@serve.ingress(api)
class Ingress(console.ConsoleReads, experiment_routes.ExperimentRoutes, grpc_ingress.GrpcReads):
    def __init__(self, settings: dict, tokens: dict[str, dict]):
        self.settings = Settings(**settings)
        self.rules = ProfileRules.from_settings(self.settings)
        # Only digests reach the replicas (serving.auth.access_tokens): no token sits
        # in their config, their environment or their logs.
        self.tokens = TokenTable(tokens)
        # The role reads need: none unless PERSONA_PROTECT_READS.
        self.read_role = "read" if self.settings.protect_reads else None
        # One store session per replica, shared by the routes, the fleet and the
        # recommender. The replica joins the fleet the app's builder started: scaling
        # the ingress never creates shards or claims partitions.
        self.store = open_store(settings=self.settings)
        self.fleet = Fleet.connect(self.settings, self.store)
        self.recommender = RecommenderCore(self.settings, self.fleet, self.store)
        self.recommender.load_catalog()
        self.recommender.load_model()
        self.recommender.load_experiment()
        if self.settings.exposure_logging:
            exposure_metrics = ExposureMetrics()
            exposures = ExposureLog(
                self.settings.exposure_buffer,
                on_written=lambda batch: exposure_metrics.written(batch, exposures.dropped),
            )
            self.recommender.exposures = exposures
        self._refresher: asyncio.Task | None = None
        self._exposure_flusher: asyncio.Task | None = None
        self.metrics = EventMetrics()
        # An event holds its fields and up to MAX_TOPICS topics; an item its fields, its
        # topics and an embedding.
        self.event_limits = BodyLimits(
            self.settings.max_batch_events, 2 * max(len(ALLOWED), MAX_TOPICS), "events"
        )
        self.item_limits = BodyLimits(
            self.settings.max_items_per_request, MAX_EMBEDDING_DIM + 2 * MAX_TOPICS, "items"
        )
        self.lookup_limits = BodyLimits(MAX_LOOKUP_IDS, 1, "user ids")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica (serve.ingress's wrapper, after the
        # ASGI shutdown, on the replica's loop); Python calls it when it frees an instance
        # whose __init__ failed part way. Stops the refresh and closes the store session
        # the replica opened (its fleet and recommender only borrow it).
        for task in (getattr(self, "_refresher", None), getattr(self, "_exposure_flusher", None)):
            if task is not None:
                task.cancel()
        store, self.store = getattr(self, "store", None), None
        if store is not None:
            store.close()

    def _keep_recommender_fresh(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self.recommender.keep_fresh())
        if self.recommender.exposures is not None and (
            self._exposure_flusher is None or self._exposure_flusher.done()
        ):
            loop = asyncio.get_running_loop()
            self._exposure_flusher = loop.create_task(self.recommender.keep_logging())

    async def _recommender_ready(self) -> RecommenderCore:
        """The recommender with its signals pulled at least once, refreshing from then on."""
        self._keep_recommender_fresh()
        if self.recommender.signals_loaded_at == 0.0:
            await self.recommender.load_signals()
        return self.recommender

    # --- batched shard reads: many requests, one actor call per shard ---
    @serve.batch(max_batch_size=128, batch_wait_timeout_s=0.002)
    async def _read_profiles(self, user_ids: list[str]) -> list[ProfileView | None]:
        found = await self.fleet.get_profiles_async(user_ids)
        return [found.get(u) for u in user_ids]

    # --- routes ---
    @api.get("/healthz", response_model=schemas.Health, tags=["operations"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        response_model=schemas.Readiness,
        responses={503: {"model": schemas.Readiness}},
        tags=["operations"],
    )
    async def readyz(self, authorization: str | None = Header(None)) -> Response:
        # Anonymous callers (probes) learn ready or not; the details name the store's
        # hosts and the shards, so they need a known token (any role may read them).
        detailed = not self.tokens or self.tokens.identify(authorization) is not None
        store_state = "ok"
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.ping), timeout=3.0)
            # Ask the shards that own partitions now, not the ones of a scale ago.
            await asyncio.wait_for(self.fleet.refresh_async(), timeout=3.0)
        except ShardUnavailable:
            pass  # the store answered; the shard that is not running is listed below
        except (PersonaError, TimeoutError) as exc:
            store_state = f"down: {exc or 'timeout'}"

        async def ping(name: str) -> str:
            handle = self.fleet.shards.get(name)
            if handle is None:
                return "down: not running"
            try:
                await asyncio.wait_for(handle.ping.remote(), timeout=3.0)
                return "ok"
            except Exception as exc:  # any failure means "not answering"
                self.fleet.forget_if_dead(name, exc)  # looked up again on the next refresh
                return f"down: {type(exc).__name__}"

        # Every shard the assignment names, running or not.
        names = sorted(set(self.fleet.owners.values()) | set(self.fleet.shards))
        states = await asyncio.gather(*(ping(n) for n in names))
        shards = dict(zip(names, states, strict=True))
        ready = store_state == "ok" and all(s == "ok" for s in shards.values())
        body = {"status": "ready" if ready else "not ready"}
        if detailed:
            body.update(store=store_state, shards=shards)
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get(
        "/v1/users/{user_id}/profile",
        response_model=schemas.ProfileOut,
        responses={**ERRORS, 404: {"model": schemas.ErrorBody, "description": "unknown user"}},
        tags=["profiles"],
    )
    async def get_profile(
        self, user_id: str, authorization: str | None = Header(None)
    ) -> JSONResponse:
        self.tokens.authorize(authorization, self.read_role)
        _valid_id(user_id, "user_id")
        record = await self._read_profiles(user_id)
        if record is None:
            raise ApiError(404, "unknown_user", f"no profile for user {user_id!r}")
        # A Response skips FastAPI's re-validation of the output through the
        # response model (the model still documents it): the hottest route's biggest cost.
        return JSONResponse(profile_view(record, self.rules, time.time()))

    @api.post(
        "/v1/profiles:batchGet",
        response_model=schemas.LookupOut,
        responses={
            **ERRORS,
            413: {"model": schemas.ErrorBody, "description": "body or id count too large"},
            415: {"model": schemas.ErrorBody, "description": "not JSON"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schemas.LookupIn.model_json_schema()}},
            }
        },
        tags=["profiles"],
        summary="Batch get profiles",
        description=f"Up to {MAX_LOOKUP_IDS:,} users' profiles in one request, read from "
        "each shard in one call. Users without a profile (never seen, deleted) are listed "
        "in `missing`, not an error.",
    )
    async def batch_get_profiles(
        self, request: Request, authorization: str | None = Header(None)
    ) -> JSONResponse:
        self.tokens.authorize(authorization, self.read_role)
        try:
            body = await self._read_body(request, JSON_TYPES, self.lookup_limits)
        except ApiError as exc:
            if exc.code != "too_many_values":
                raise
            raise ApiError(
                413, "too_many_ids", f"at most {MAX_LOOKUP_IDS} user ids per request"
            ) from None
        found = await lookup_profiles(self.fleet, lookup_ids(body))
        return JSONResponse(lookup_view(found, self.rules, time.time()))

    @api.get(
        "/v1/users/{user_id}/recommendations",
        response_model=schemas.RecommendationsOut,
        responses=ERRORS,
        tags=["recommendations"],
    )
    async def get_recommendations(
        self,
        request: Request,
        user_id: str,
        k: int = Query(DEFAULT_K, ge=1, le=MAX_K),
        topic: str | None = Query(None, max_length=MAX_TOPIC_CHARS),
        exclude_seen: bool = True,
        authorization: str | None = Header(None),
    ) -> JSONResponse:
        self.tokens.authorize(authorization, self.read_role)
        _valid_id(user_id, "user_id")
        record = await self._read_profiles(user_id)
        recommender = await self._recommender_ready()
        result = recommender.recommend(user_id, record, k, topic or None, exclude_seen)
        request.state.variant = result["variant"]  # for the request metric
        return JSONResponse(result)

    @api.post(
        "/v1/events",
        response_model=schemas.Ack,
        responses={
            **ERRORS,
            413: {"model": schemas.ErrorBody, "description": "body or batch too large"},
            415: {"model": schemas.ErrorBody, "description": "not JSON or msgpack"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "A batch of events, as JSON or msgpack (application/msgpack).",
                "content": {
                    "application/json": {
                        "schema": {"type": "array", "items": schemas.EventIn.model_json_schema()}
                    },
                    "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
        tags=["events"],
    )
    async def post_events(
        self,
        request: Request,
        idempotency_key: str | None = Header(None),
        authorization: str | None = Header(None),
    ) -> dict:
        caller = self.tokens.authorize(authorization, "write")
        # A key names a batch, never a URL: only the common id rules apply.
        batch_id = (
            _valid_id(idempotency_key, "Idempotency-Key", in_url_path=False)
            if idempotency_key
            else uuid.uuid4().hex
        )
        events = await self._read_batch(request)
        try:
            ack = await self.fleet.apply_async(
                f"{client_scope(caller)}:{batch_id}", events, all_or_nothing=True
            )
        except InvalidEvents as exc:
            self.metrics.events(rejected=len(exc.errors))
            raise
        self.metrics.events(applied=ack["applied"])
        return {
            "batch_id": batch_id,
            "applied": ack["applied"],
            "duplicate": ack["duplicate"],
            "rejected": ack["rejected"],
        }

    async def _read_batch(self, request: Request) -> list:
        events = await self._read_body(request, JSON_TYPES + MSGPACK_TYPES, self.event_limits)
        if not isinstance(events, list):
            raise ApiError(422, "invalid_events", "the body must be an array of events")
        if not events:
            raise ApiError(422, "empty_batch", "the batch holds no events")
        if len(events) > self.settings.max_batch_events:
            raise ApiError(
                413,
                "batch_too_large",
                f"{len(events)} events; at most {self.settings.max_batch_events} per request",
            )
        return events

    async def _read_body(self, request: Request, media: tuple[str, ...], limits: BodyLimits) -> Any:
        """The decoded body of a write, or an ApiError: 415 for another media type, 413
        over the byte limit or the structure budget, 400 when it does not decode, 422 for
        numbers and nesting no record can hold. Large bodies decode in a worker thread."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in media:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send {' or '.join(media)}, not {media_type or 'no Content-Type'!r}",
            )
        body = await self._body_bytes(request)
        decode = decode_msgpack_records if media_type in MSGPACK_TYPES else decode_json
        if len(body) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(decode, body, limits)
        return decode(body, limits)

    async def _body_bytes(self, request: Request) -> bytearray:
        """The body, streamed and refused (413) as soon as it passes max_body_bytes."""
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, "body_too_large", f"the body limit is {limit} bytes")
        declared = request.headers.get("content-length")
        if declared is not None:
            # The HTTP server refuses a malformed length; a proxy in front may not.
            if not (declared.isascii() and declared.isdigit()):
                raise ApiError(400, "bad_content_length", "Content-Length must be digits")
            digits = declared.lstrip("0")
            if len(digits) > len(str(limit)) or int(digits or "0") > limit:
                raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return body

    @api.delete(
        "/v1/users/{user_id}",
        status_code=204,
        responses={**ERRORS, 404: {"model": schemas.ErrorBody, "description": "nothing to delete"}},
        tags=["profiles"],
    )
    async def delete_user(self, user_id: str, authorization: str | None = Header(None)) -> Response:
        self.tokens.authorize(authorization, "admin")
        _valid_id(user_id, "user_id")
        existed = await self.fleet.delete_user_async(user_id)
        if not existed:
            raise ApiError(404, "unknown_user", f"no data held for user {user_id!r}")
        return Response(status_code=204)

    @api.put(
        "/v1/items",
        response_model=schemas.Upserted,
        responses={
            **ERRORS,
            413: {"model": schemas.ErrorBody, "description": "body or upload too large"},
            415: {"model": schemas.ErrorBody, "description": "not JSON"},
        },
        tags=["catalog"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["items"],
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "items": schemas.ItemIn.model_json_schema(),
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def put_items(self, request: Request, authorization: str | None = Header(None)) -> dict:
        self.tokens.authorize(authorization, "admin")
        body = await self._read_body(request, JSON_TYPES, self.item_limits)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(422, "invalid_items", 'send {"items": [...]} with at least one item')
        limit = self.settings.max_items_per_request
        if len(items) > limit:
            raise ApiError(
                413, "too_many_items", f"{len(items)} items; at most {limit} per request"
            )
        errors = [
            {"index": n, "reason": problem}
            for n, item in enumerate(items)
            if (problem := item_problem(item))
        ]
        if errors:
            raise ApiError(422, "invalid_items", f"{len(errors)} invalid item(s)", errors=errors)
        await asyncio.to_thread(
            self.store.upsert_items, {item["item_id"]: encode_item(item) for item in items}
        )
        # This replica's recommender sees the upload now; others on their next
        # catalog refresh (catalog_refresh_s).
        await self.recommender.refresh_now()
        self._keep_recommender_fresh()
        return {"upserted": len(items)}

    @api.get(
        "/v1/items/{item_id}",
        response_model=schemas.ItemOut,
        responses={**ERRORS, 404: {"model": schemas.ErrorBody, "description": "unknown item"}},
        tags=["catalog"],
    )
    async def get_item(self, item_id: str, authorization: str | None = Header(None)) -> dict:
        # The catalog needs a token whenever there are tokens, reads protected or not.
        self.tokens.authorize(authorization, "read")
        _valid_id(item_id, "item_id")
        found = await asyncio.to_thread(self.store.get_items, [item_id])
        if item_id not in found:
            raise ApiError(404, "unknown_item", f"no item {item_id!r} in the catalog")
        return decode_item(item_id, found[item_id])


def build_app(args: Settings | dict | None = None):
    """Serve application builder: `serve run serving.app:build_app` or serve.yaml's import_path.

    ``args`` is the settings object of the process that starts the app (`persona up`
    passes its own), or a dict of overrides of the PERSONA_* variables where the
    application is built (Serve's config files). Serve calls a builder with exactly one
    argument (it refuses any other signature at deploy time). The builder, not the
    replicas, makes sure the fleet exists (idempotent); every replica gets these
    settings. Deployment options (replicas, autoscaling) come from serve.yaml."""
    return build_ingress(args)


def build_ingress(args: Settings | dict | None = None, *, replicas: int | None = None):
    """`build_app` with the ingress replica count fixed (benchmarks, evaluation)."""
    settings = args if isinstance(args, Settings) else load_settings(**(args or {}))
    # Here, before anything starts: the plaintext token becomes a digest, and an app that
    # would run open where it must not is refused (serving.auth).
    tokens = access_tokens(settings)
    refuse_open_exposure(settings, tokens)
    Fleet.start(settings).close()
    ingress = Ingress if replicas is None else Ingress.options(num_replicas=replicas)
    return ingress.bind(dataclasses.asdict(settings.public()), tokens)


def __getattr__(name: str):
    # `serve run serving.app:app` builds with the environment's settings, lazily, so
    # importing this module (tests, docs) does not read settings or touch a store.
    if name == "app":
        return build_app()
    raise AttributeError(name)
