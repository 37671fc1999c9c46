"""Durable tier: the store contract, its SQLite and Cassandra backends, and open_store(url).

Knows nothing of Ray. Accepted store URLs:

    sqlite:///absolute/path/persona.db     (embedded default)
    sqlite:///:memory:                     (tests only: lives and dies with the process)
    cassandra://host1,host2:9042/keyspace?replication=3&consistency=LOCAL_QUORUM
        optional: strategy=SimpleStrategy|NetworkTopologyStrategy, datacenter=NAME,
                  timeout=SECONDS, concurrency=N
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

from persona.errors import ConfigError
from persona.settings import Settings, load_settings
from storage.base import Assignment, Checkpoint, Store

__all__ = ["Assignment", "Checkpoint", "Store", "open_store", "parse_store_url"]

ACCEPTED_FORMS = (
    "sqlite:///path/to/persona.db, "
    "cassandra://host1,host2:9042/keyspace?replication=3&consistency=LOCAL_QUORUM"
)
_CASSANDRA_PARAMS = {
    "replication",
    "consistency",
    "strategy",
    "datacenter",
    "timeout",
    "concurrency",
}
_KEYSPACE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")


def _invalid(url: str, why: str) -> ConfigError:
    return ConfigError(f"invalid store URL {url!r}: {why}. Accepted forms: {ACCEPTED_FORMS}")


def parse_store_url(url: str, settings: Settings | None = None):
    """Return ("sqlite", path) or ("cassandra", CassandraOptions) for a store URL."""
    settings = settings or load_settings()
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path or parts.path == "/":
            raise _invalid(url, "a SQLite URL is sqlite:/// followed by a file path")
        path = parts.path[1:] if parts.path == "/:memory:" else parts.path
        return "sqlite", path
    if parts.scheme == "cassandra":
        from storage.cassandra_store import CassandraOptions

        hosts_part, _, port_part = parts.netloc.rpartition(":")
        if not hosts_part:
            hosts_part, port_part = parts.netloc, str(settings.cassandra_port)
        hosts = tuple(h for h in hosts_part.split(",") if h)
        if not hosts:
            raise _invalid(url, "no Cassandra host given")
        if not port_part.isdigit():
            raise _invalid(url, f"port {port_part!r} is not a number")
        keyspace = parts.path.lstrip("/")
        if not _KEYSPACE.match(keyspace):
            raise _invalid(url, "the path must be a keyspace name (letters, digits, _)")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - _CASSANDRA_PARAMS
        if unknown:
            raise _invalid(url, f"unknown parameter(s) {sorted(unknown)}")
        try:
            options = CassandraOptions(
                hosts=hosts,
                port=int(port_part),
                keyspace=keyspace,
                replication_factor=int(query.get("replication", 1)),
                strategy=query.get("strategy", "SimpleStrategy"),
                datacenter=query.get("datacenter") or None,
                consistency=query.get("consistency", "LOCAL_QUORUM").upper(),
                timeout_s=float(query.get("timeout", settings.cassandra_timeout_s)),
                write_concurrency=int(
                    query.get("concurrency", settings.cassandra_write_concurrency)
                ),
                journal_bucket_rows=settings.journal_bucket_rows,
                durability=settings.durability,
            )
        except ValueError as exc:
            raise _invalid(url, str(exc)) from exc
        if options.strategy not in ("SimpleStrategy", "NetworkTopologyStrategy"):
            raise _invalid(url, f"strategy {options.strategy!r} is not a known strategy")
        if options.replication_factor < 1:
            raise _invalid(url, "replication must be at least 1")
        return "cassandra", options
    raise _invalid(url, f"unknown scheme {parts.scheme or '(none)'!r}")


def open_store(url: str | None = None, settings: Settings | None = None) -> Store:
    """Open (and create if needed) the store a URL names; default: the settings' store."""
    settings = settings or load_settings()
    kind, target = parse_store_url(url or settings.resolved_store_url(), settings)
    if kind == "sqlite":
        from storage.sqlite_store import SqliteStore

        return SqliteStore(target, durability=settings.durability)
    from storage.cassandra_store import CassandraStore

    return CassandraStore(target)
