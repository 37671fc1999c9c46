"""The gRPC reads for service-to-service callers (serving/persona.proto, package
persona.v1), served through Ray Serve's gRPC proxy by the same Ingress replicas as the
HTTP API: the Ingress inherits `GrpcReads`, so a gRPC read takes the HTTP read's path
(its tokens, its batched shard reads, `profile_view`, the recommender and its exposure
log) and only the message differs.

Serve routes a call by its method name to the method of that name on the app's ingress
deployment and passes the request message (and `grpc_context`); the application is
picked by the `application` metadata key. Errors become status codes here: NOT_FOUND,
INVALID_ARGUMENT with the reason, UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE when
a shard or the store is gone; INTERNAL only for what is a bug.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from actors.events import check_id
from persona.errors import PersonaError, ShardUnavailable, StaleEpoch, StoreUnavailable
from persona.settings import Settings
from serving import persona_pb2 as pb
from serving.views import (
    DEFAULT_K,
    MAX_K,
    MAX_TOPIC_CHARS,
    ApiError,
    check_lookup_ids,
    lookup_profiles,
    lookup_view,
    profile_view,
)

log = logging.getLogger(__name__)

# What Serve's gRPC proxy imports to register the service (gRPCOptions, serve.yaml).
SERVICER = "serving.grpc_ingress.add_servicer"

# The HTTP statuses of the API's refusals (serving.views.ApiError) as gRPC codes, by the
# usual correspondence; the HTTP API's 413s are bad input for a caller of this API.
_CODE_OF_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
# Persona's errors: the ones worth a retry are UNAVAILABLE (the HTTP API's 503s).
_RETRYABLE = (ShardUnavailable, StoreUnavailable, StaleEpoch)


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are no message of its type. gRPC answers a decoder that
    raises with UNKNOWN before Persona's code runs; this reaches the method instead,
    which answers INVALID_ARGUMENT."""

    type_name: str
    reason: str


def _lenient(message_type: type) -> Callable[[bytes], Any]:
    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc))

    return decode


def add_servicer(servicer: Any, server: Any) -> None:
    """Register persona.v1.Persona on ``server`` as the generated
    ``persona_pb2_grpc.add_PersonaServicer_to_server`` does, with requests decoded by
    ``_lenient``. Serve's gRPC proxy and replicas call it (SERVICER) with a stand-in
    servicer and route each method to the Ingress."""
    service = pb.DESCRIPTOR.services_by_name["Persona"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)


def grpc_options(settings: Settings) -> dict | None:
    """Serve's gRPC proxy options for these settings (serve.start's grpc_options), or
    None when the gRPC port is 0 (no gRPC server is started)."""
    if not settings.grpc_port:
        return None
    return {"port": settings.grpc_port, "grpc_servicer_functions": [SERVICER]}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a failed call answers with."""
    if isinstance(exc, ApiError):
        # The reasons by index (a batch's invalid ids) go along: details are all a gRPC
        # caller gets.
        reasons = [
            f"{e.get('index', '?')}: {e.get('reason', '')}"
            for e in exc.details.get("errors", [])[:5]
        ]
        details = f"{exc.message} ({'; '.join(reasons)})" if reasons else exc.message
        return _CODE_OF_HTTP.get(exc.status, grpc.StatusCode.INTERNAL), details
    if isinstance(exc, _RETRYABLE):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, PersonaError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, "an unexpected error; it has been logged"


def _rpc(empty: type) -> Callable:
    """A gRPC method of the Ingress: its refusals and failures set the call's status
    (the message is then an empty ``empty``), as the HTTP API's handlers answer errors."""

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)  # Serve reads the signature: it passes grpc_context
        async def call(self, request, grpc_context=None):
            try:
                if isinstance(request, Undecodable):
                    raise ApiError(
                        400, "malformed_request", f"not a {request.type_name}: {request.reason}"
                    )
                return await method(self, request, grpc_context)
            except Exception as exc:
                code, details = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("gRPC %s failed", method.__name__)
                if grpc_context is None:  # called through a handle, not the proxy
                    raise
                grpc_context.set_code(code)
                grpc_context.set_details(details)
                return empty()

        return call

    return wrap


def bearer(grpc_context) -> str | None:
    """The call's `authorization` metadata (gRPC lower-cases metadata keys)."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key == "authorization":
            return value
    return None


def valid_user_id(value: str) -> str:
    # The HTTP API's rule, so the same users are addressable both ways.
    problem = check_id(value, "user_id")
    if problem:
        raise ApiError(422, "invalid_id", problem)
    return value


# --- messages from the HTTP views (one view, two encodings) ------------------------------
def profile_message(view: dict) -> pb.Profile:
    """A Profile message from ``serving.views.profile_view``'s dict."""
    profile = pb.Profile(
        user_id=view["user_id"],
        version=view["version"],
        events=view["events"],
        first_seen=view["first_seen"],
        last_seen=view["last_seen"],
        counters=view["counters"],
        hidden_items=view["hidden_items"],
        has_embedding=view["has_embedding"],
    )
    # add() per entry builds the repeated messages in place: half the time of handing the
    # constructor a list of messages (~50 vs ~110 us for 64 interests and 100 actions).
    add = profile.interests.add
    for interest in view["interests"]:
        add(topic=interest["topic"], score=interest["score"])
    add = profile.recent_actions.add
    for action in view["recent_actions"]:
        add(item_id=action["item_id"], action=action["action"], ts=action["ts"])
    return profile


def recommendations_message(result: dict) -> pb.Recommendations:
    """A Recommendations message from ``RecommenderCore.recommend``'s dict."""
    return pb.Recommendations(
        user_id=result["user_id"],
        rec_id=result["rec_id"],
        experiment=result["experiment"],
        variant=result["variant"],
        cold_start=result["cold_start"],
        model=result["model"],
        items=[
            pb.Recommendation(
                item_id=item["item_id"],
                score=item["score"],
                reason=item["reason"],
                sources=item["sources"],
            )
            for item in result["items"]
        ],
    )


def recommend_arguments(request: pb.RecommendRequest) -> tuple[int, str | None, bool]:
    """(k, topic, exclude_seen) of a Recommend call, checked as the HTTP query is."""
    k = request.k or DEFAULT_K
    if k > MAX_K:
        raise ApiError(422, "invalid_request", f"k: at most {MAX_K}, got {k}")
    topic = request.topic if request.HasField("topic") else ""
    if len(topic) > MAX_TOPIC_CHARS:
        raise ApiError(
            422, "invalid_request", f"topic: at most {MAX_TOPIC_CHARS} characters, got {len(topic)}"
        )
    exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
    return k, topic or None, exclude_seen


class GrpcReads:
    """The persona.v1.Persona methods, on the Ingress (it inherits this class: Serve
    calls the method named as the RPC with the request message). They follow the HTTP
    reads' auth rule: a "read" token when reads are protected."""

    @_rpc(pb.Profile)
    async def GetProfile(self, request: pb.GetProfileRequest, grpc_context=None) -> pb.Profile:
        self.tokens.authorize(bearer(grpc_context), self.read_role)
        user_id = valid_user_id(request.user_id)
        record = await self._read_profiles(user_id)
        if record is None:
            raise ApiError(404, "unknown_user", f"no profile for user {user_id!r}")
        return profile_message(profile_view(record, self.rules, time.time()))

    @_rpc(pb.BatchGetProfilesResponse)
    async def BatchGetProfiles(
        self, request: pb.BatchGetProfilesRequest, grpc_context=None
    ) -> pb.BatchGetProfilesResponse:
        # POST /v1/profiles:batchGet's path: one actor call per owning shard.
        self.tokens.authorize(bearer(grpc_context), self.read_role)
        found = await lookup_profiles(self.fleet, check_lookup_ids(request.user_ids))
        view = lookup_view(found, self.rules, time.time())
        return pb.BatchGetProfilesResponse(
            profiles=[profile_message(p) for p in view["profiles"]], missing=view["missing"]
        )

    @_rpc(pb.Recommendations)
    async def Recommend(
        self, request: pb.RecommendRequest, grpc_context=None
    ) -> pb.Recommendations:
        self.tokens.authorize(bearer(grpc_context), self.read_role)
        user_id = valid_user_id(request.user_id)
        k, topic, exclude_seen = recommend_arguments(request)
        record = await self._read_profiles(user_id)
        recommender = await self._recommender_ready()
        return recommendations_message(
            recommender.recommend(user_id, record, k, topic, exclude_seen)
        )
