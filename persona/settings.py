"""The one settings object: every knob with its default, read from PERSONA_* variables.

Each field below is a setting; its environment variable is ``PERSONA_`` plus the
field name in upper case (``half_life_days`` -> ``PERSONA_HALF_LIFE_DAYS``). An
optional YAML file named by ``PERSONA_CONFIG`` supplies values first; environment
variables win over it. Dict-valued settings take JSON in the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from persona.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _default_data_dir() -> str:
    # In a checkout, keep data next to the code (git-ignored); installed elsewhere, in $HOME.
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return str(PROJECT_ROOT / "data")
    return str(Path.home() / ".persona")


@dataclass(frozen=True)
class Settings:
    # --- where things live ---
    data_dir: str = field(default_factory=_default_data_dir)
    # Empty means sqlite:///<data_dir>/persona.db (the embedded default).
    store_url: str = ""
    # Ray namespace that holds the shard actors; Serve replicas look shards up in it.
    namespace: str = "persona"

    # --- partitions and shards ---
    # Fixed when a deployment is first created and stored; changing it later is refused.
    partitions: int = 256
    shards: int = 2
    # CPUs each shard actor reserves; 0 lets many shards share a laptop's cores.
    shard_cpus: float = 0.0
    # Custom resources each shard asks for: nodes advertise how many shards they hold
    # (cluster.yaml), so the autoscaler adds nodes as the shard count grows.
    shard_resources: dict = field(default_factory=lambda: {"persona_shard": 1})

    # --- profile model ---
    half_life_days: float = 7.0
    top_k_topics: int = 64
    recent_actions: int = 100
    # Items remembered as hidden, so they are never recommended again (bounded).
    hidden_items: int = 200
    # Bytes of each profile's filter of the items that left its recent actions (a Bloom
    # filter, 3 bits an item), so recommendations leave out what a user met long ago,
    # not only in the last recent_actions: 512 bytes keep false positives near 1% up to
    # ~350 earlier items, 3% at 500. Only profiles past recent_actions hold one; 0: none.
    # On MovieLens validation splits, leaving out only the last 100 re-recommended a
    # heavy user's old films and cost 4-5% of Recall@10 at long horizons (bench/RESULTS.md).
    seen_filter_bytes: int = 512
    action_weights: dict = field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 3.0,
            "like": 4.0,
            "save": 5.0,
            "share": 6.0,
            "purchase": 8.0,
            "hide": -8.0,
        }
    )

    # --- events ---
    max_batch_events: int = 10_000
    max_future_seconds: float = 86_400.0

    # --- durability ---
    # What an acknowledged write survives (README, "What an acknowledgement means").
    # "normal": a process crash. SQLite WAL with synchronous=NORMAL; Cassandra's
    # periodic commitlog sync (10 s), so a power loss of every replica may lose the
    # last seconds. "strict": also an OS crash or power loss. SQLite synchronous=FULL
    # (an fsync per commit); the local Cassandra node runs commitlog_sync: batch (an
    # fsync before each ack; on a real cluster that is the operator's cassandra.yaml).
    durability: str = "normal"
    checkpoint_interval_s: float = 30.0
    checkpoint_dirty_threshold: int = 50_000
    # Journal rows per Cassandra partition: bounds partition size (a row is one batch).
    journal_bucket_rows: int = 64
    # How long an applied (source, line) is recognised when sent again: a rerun of a
    # file or a retried Idempotency-Key within this time applies nothing twice.
    dedup_retention_s: int = 7 * 86_400
    # (partition, source) entries of applied lines a shard keeps in memory; older
    # ones are read back from the store when a source shows up again.
    dedup_memory_entries: int = 100_000
    # Profiles a shard keeps in memory (0: no cap); beyond it the least recently
    # used are passivated (written if dirty, then dropped) and reloaded on demand.
    max_resident_profiles: int = 0

    # --- Cassandra ---
    cassandra_write_concurrency: int = 64
    cassandra_timeout_s: float = 10.0
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    cassandra_heap: str = "1G"

    # --- item signals (kept by shards, aggregated by the recommender) ---
    trending_half_life_days: float = 1.0
    # What two items have in common fades slowly: on MovieLens (7 months of ratings) a
    # 30-day half-life lost a tenth of validation recall against 90 days or more.
    co_engagement_half_life_days: float = 90.0
    # Neighbours per item in the co-engagement graph: the M most similar go into a
    # snapshot, and a shard holds at most 2M per item. Recommendations add up the
    # similarities of many recent items: on MovieLens, M=20 cut validation recall of
    # the co-engagement source by a third and M=100 lost almost nothing.
    co_engagement_neighbours: int = 100
    # A co-engagement pair: an engagement and one of the user's CONTEXT engagements
    # before it (actors/item_stats.py), at most this far apart: fifty ratings in ten
    # minutes pair with their neighbours in the sequence, and a once-a-day visitor's
    # items with yesterday's.
    co_engagement_window_s: float = 2 * 86_400.0

    # --- recommendations ---
    # How the recent sequence seeds the ``co`` and ``model`` sources (serving/ranking.py,
    # Seeds): the seed_items latest distinct engagements (at most recent_actions), the
    # n-th most recent weighing seed_recency**n (seed_model_recency**n in the model's
    # user vector). When a user comes back is not known, so these, max_per_topic and
    # the model weight below were chosen for the worst ratio to item-kNN over
    # MovieLens validation splits carved at horizons of 1, 5 and 10 ratings and 20% of
    # each user's history (`persona evaluate --tune-horizons`, bench/RESULTS.md): a
    # 0.8 decay (model weight 0.3) was best one to five ratings ahead and worst 20%
    # ahead (1.06x); 0.9 with the model at 0.5 gave up 1-4% at short horizons and
    # raised the worst ratio to 1.10x.
    seed_items: int = 20
    seed_recency: float = 0.9
    seed_model_recency: float = 0.8
    # At most this many items of one primary topic in a list: on MovieLens (18 genres,
    # most films Drama or Comedy first) 3 in ten cost 7% of validation Recall@10, and 8
    # gained 1-3% over 5 at horizons of 5 and 10 ratings; the horizon tuning chose 12,
    # within noise of 8, which keeps a list of ten from being one genre.
    max_per_topic: int = 8
    catalog_refresh_s: float = 30.0
    # The item-embedding model (`persona train`, jobs/train_embeddings.py): implicit
    # ALS with these factors, regularization, confidence scale and sweeps. Chosen on
    # the validation split of MovieLens-100k (bench/RESULTS.md): 32-64 factors and a
    # regularization of 0.05-20 were within noise of each other; 64 / 1.0 was the
    # least sensitive to the blend weight.
    model_factors: int = 64
    model_regularization: float = 1.0
    model_alpha: float = 5.0
    model_iterations: int = 15
    signals_refresh_s: float = 5.0
    # Experiment variants: share of users (percent) and the blend of candidate sources
    # (co, topic, embedding, trending, popular, model; "hidden" takes away what
    # resembles the user's hides). Chosen on validation splits (`persona evaluate
    # --tune`, never the test split): on MovieLens co-engagement ranked best, the
    # trained model's neighbours added 1-3% of Recall@10 at any weight from 0.1 to 1
    # (0.5: the horizon tuning's choice, worth most 20% ahead), and popular/trending
    # took recall away from users with neighbours, so they are kept small: they serve
    # users without neighbours and cold start. On generated data topics added a little.
    experiments: dict = field(
        default_factory=lambda: {
            "control": {
                "share": 50,
                "blend": {
                    "co": 1.0,
                    "model": 0.5,
                    "topic": 0.05,
                    "popular": 0.01,
                    "trending": 0.005,
                },
            },
            "sequence-heavy": {
                "share": 50,
                "blend": {"co": 1.0, "model": 0.5, "popular": 0.01, "trending": 0.005},
            },
        }
    )

    # --- experiments: exposures and attribution (README, "Experiments") ---
    # Log what recommendations showed (off: no exposures, so no attribution without a
    # rec_id and no results; responses still carry their rec_id).
    exposure_logging: bool = True
    # Exposures a replica holds before flushing them to the store; beyond it the
    # oldest are dropped and counted, so a store
    # outage never grows a replica's memory nor slows recommendations.
    exposure_buffer: int = 20_000
    # How often a replica flushes exposures (to the owning shards, then the store).
    exposure_flush_s: float = 1.0
    # How long exposures and attributions are kept (Cassandra TTL, SQLite pruning).
    exposure_retention_s: int = 30 * 86_400
    # An event without a rec_id is attributed to the latest exposure of its item to
    # its user at most this long before it.
    attribution_window_s: float = 86_400.0
    # Users whose recent exposures a shard keeps for attribution (least recently
    # exposed forgotten first).
    exposure_index_users: int = 200_000

    # --- serving ---
    # The API's bearer tokens by name, as SHA-256 digests, never plaintext (JSON in
    # PERSONA_API_TOKENS): {"ci": {"sha256": "<hex>", "role": "write"}}. Roles: "read"
    # (profiles, recommendations and items, /readyz details), "write" (events, and
    # read), "admin" (deletes and the catalog upload, and write). "sha256" may list
    # several digests: rotate by adding the new one, rolling the clients, removing the
    # old. Idempotency-Keys are scoped by the name (README, "Security").
    api_tokens: dict = field(default_factory=dict)
    # One plaintext admin token, named "api_token" (surrounding whitespace dropped).
    # Only its digest leaves the process that builds the app; never printed.
    api_token: str = field(default="", repr=False)
    # Reads need a "read" token too (refused at start when no token is configured).
    protect_reads: bool = False
    # The address Serve's HTTP proxy binds: set it beside serve.yaml's
    # http_options.host. On any address but loopback, an app with no token refuses to
    # start unless anonymous writes are allowed explicitly (logged as a warning).
    bind_host: str = "127.0.0.1"
    allow_anonymous_writes: bool = False
    # Bytes of one POST /v1/events or PUT /v1/items body.
    max_body_bytes: int = 8 * 1024 * 1024
    # Items of one PUT /v1/items (events of one POST: max_batch_events).
    max_items_per_request: int = 10_000
    http_port: int = 8000
    # The port of Serve's gRPC proxy for the persona.v1 reads (serving/persona.proto),
    # started by `persona up` beside the HTTP API; 0: no gRPC. Keep serve.yaml's
    # grpc_options.port equal to it. Serve's default.
    grpc_port: int = 9000
    # The Ray head `persona up` starts: its GCS port and its dashboard (jobs API) port.
    ray_port: int = 6379
    dashboard_port: int = 8265

    def model_fingerprint(self) -> str:
        """Digests of what every process that writes profiles must share: the actions
        and update rules, and the store. A shard refuses batches prepared under another
        fingerprint: a job or replica started with a different PERSONA_ACTION_WEIGHTS
        would journal events its shards cannot apply, and one pointed at another store
        would route by assignments the shards never see."""
        import hashlib

        shared = {name: getattr(self, name) for name in MODEL_FIELDS}
        model = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]
        store = hashlib.sha256(self.store_identity().encode()).hexdigest()[:12]
        return f"rules {model}, store {store}"

    def store_identity(self) -> str:
        """Which store, without its connection tuning: scheme, hosts and keyspace or path
        (two processes on one deployment may set timeouts differently, not stores)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.resolved_store_url())
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{Path(self.data_dir) / 'persona.db'}"

    @property
    def half_life_seconds(self) -> float:
        return self.half_life_days * 86_400.0

    def public(self) -> Settings:
        """These settings without the plaintext API token: what may be handed to actors,
        job rows and records (the digests of api_tokens may go anywhere)."""
        return dataclasses.replace(self, api_token="")


# The settings a batch's meaning depends on (see Settings.model_fingerprint).
MODEL_FIELDS = (
    "action_weights",
    "half_life_days",
    "top_k_topics",
    "recent_actions",
    "hidden_items",
    "trending_half_life_days",
    "co_engagement_half_life_days",
    "co_engagement_neighbours",
    "co_engagement_window_s",
)


def _coerce(name: str, raw, kind):
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind is dict:
            value = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name} (PERSONA_{name.upper()}): {exc}") from exc


_KINDS = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}


def load_settings(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Settings from the YAML file (if any), then PERSONA_* variables, then overrides."""
    env = os.environ if env is None else env
    values: dict = {}
    config_file = env.get("PERSONA_CONFIG")
    if config_file:
        import yaml

        try:
            values.update(yaml.safe_load(Path(config_file).read_text()) or {})
        except OSError as exc:
            raise ConfigError(f"PERSONA_CONFIG={config_file}: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown settings in {config_file}: {sorted(unknown)}")
    for name in fields:
        key = f"PERSONA_{name.upper()}"
        if key in env:
            values[name] = env[key]
    values.update(overrides)
    typed = {name: _coerce(name, raw, _KINDS[fields[name].type]) for name, raw in values.items()}
    return Settings(**typed)
