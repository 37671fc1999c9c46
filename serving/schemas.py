"""Request and response models: they document the API in /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel, Field

from serving.views import MAX_LOOKUP_IDS


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code")
    message: str = Field(description="what was wrong and what to do")
    errors: list[dict] | None = Field(
        None,
        description="the problems one by one: index (of an event or item) or field "
        "(a query parameter or header), and reason",
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


class EventIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=128)
    item_id: str = Field(min_length=1, max_length=128)
    action: str = Field(description="one of the configured actions (view, click, save, hide, ...)")
    ts: float = Field(ge=0, description="seconds since the epoch; at most a day ahead")
    topics: list[str] = Field(default_factory=list, max_length=16)
    weight: float = Field(1.0, gt=0, le=1000)
    event_id: str | None = Field(None, max_length=128)
    rec_id: str | None = Field(
        None, max_length=128, description="the recommendations response this event answers"
    )
    position: int | None = Field(None, ge=0, description="the item's place in that response")


class Ack(BaseModel):
    batch_id: str
    applied: int
    duplicate: int
    rejected: int


class Interest(BaseModel):
    topic: str
    score: float = Field(description="decayed to the time of the request")


class RecentAction(BaseModel):
    item_id: str
    action: str
    ts: float


class ProfileOut(BaseModel):
    user_id: str
    version: int
    events: int
    first_seen: float | None
    last_seen: float | None
    counters: dict[str, int]
    interests: list[Interest]
    recent_actions: list[RecentAction]
    hidden_items: list[str]
    has_embedding: bool


class LookupIn(BaseModel):
    user_ids: list[str] = Field(
        max_length=MAX_LOOKUP_IDS,
        description=f"the users to read, at most {MAX_LOOKUP_IDS:,}; duplicates are answered once",
    )


class LookupOut(BaseModel):
    profiles: list[ProfileOut] = Field(
        description="the profiles found, in the order their ids were first asked for"
    )
    missing: list[str] = Field(
        description="ids that hold no profile: never seen, or deleted (not an error)"
    )


class Recommendation(BaseModel):
    item_id: str
    score: float
    reason: str
    sources: dict[str, float] = Field(
        default_factory=dict,
        description="what each candidate source added to the score (blend weight x its "
        "normalised score; `hidden` takes away, negative): they sum to the score",
    )


class RecommendationsOut(BaseModel):
    user_id: str
    rec_id: str = Field(description="names this response: send it with the events it causes")
    experiment: str = Field(description="the running experiment")
    variant: str | None = Field(
        description="the experiment variant that served this response (none: outside it)"
    )
    cold_start: bool
    model: str | None = Field(
        None, description="the item-embedding model version ranking used (none published yet)"
    )
    items: list[Recommendation]


class ItemIn(BaseModel):
    item_id: str = Field(min_length=1, max_length=128)
    topics: list[str] = Field(default_factory=list, max_length=16)
    embedding: list[float] | None = None
    created_at: float = 0.0


class ItemOut(ItemIn):
    pass


class Upserted(BaseModel):
    upserted: int


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description='"ready" or "not ready"')
    store: str | None = Field(None, description="store state; only for a valid token")
    shards: dict[str, str] | None = Field(None, description="shard states; only for a valid token")


class NearItem(BaseModel):
    item_id: str
    similarity: float = Field(description="cosine similarity to the user's vector")
    topics: list[str]


class NearestOut(BaseModel):
    user_id: str
    model: str | None = Field(None, description="the serving model version (none published yet)")
    embedding: list[NearItem] = Field(
        description="nearest to the profile's interest vector among the catalog's item "
        "embeddings (empty when the profile has none)"
    )
    model_items: list[NearItem] = Field(
        description="nearest to the recent engagements in the serving model (the `model` "
        "recommendation source; empty without a model)"
    )


class ShardsOut(BaseModel):
    shards: list[dict] = Field(
        description="per shard: name, state (ok, or down with why), and its statistics as "
        "`persona status` shows them (resident, dirty, evicted, journal positions, ...)"
    )
