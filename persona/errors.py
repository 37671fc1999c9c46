"""Project exceptions, one family for every tier; the HTTP layer maps them to status codes."""


class PersonaError(Exception):
    """Base class: every error Persona raises on purpose derives from this."""


class ConfigError(PersonaError):
    """A setting or store URL is invalid; the message says what is accepted."""


class CorruptRecord(PersonaError):
    """A stored blob failed its checksum or has an unknown format version."""


class StoreUnavailable(PersonaError):
    """The store could not be reached or timed out; the operation did not happen
    (or, for a write, may not have happened) and can be retried."""


class StaleEpoch(PersonaError):
    """A writer's partition epoch is older than the store's: it no longer owns the
    partition and must not write it."""


class ShardUnavailable(PersonaError):
    """The shard the store names as a partition's owner is not running (killed for
    good, or never started in this namespace): requests for that partition cannot be
    routed until it runs again. The message names the shard and its partitions. Like
    any refused write, it may have landed: resend it under the same source."""


class JournalConflict(PersonaError):
    """A journal position is already taken: another incarnation of the writer (or a
    seal) got there first, so this writer is stale."""


class VersionConflict(PersonaError):
    """A model version name, or a position of the model log, is already taken: a
    published version never changes, and two switches never share a position."""


class InvalidEvents(PersonaError):
    """A batch contained invalid events; nothing of it was applied."""

    def __init__(self, errors: list[dict]):
        self.errors = errors
        shown = "; ".join(f"event {e['index']}: {e['reason']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} invalid event(s): {shown}{more}")


class ToolMissing(PersonaError):
    """A program the local tooling needs (Java 17, Maven) is not installed."""
