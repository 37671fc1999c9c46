"""Every CQL statement Persona runs, next to the table it belongs to (schema in one place).

Tables are created idempotently by CassandraStore. Partition sizes are bounded:
profiles, items and tombstones are one row per partition; the journal is bucketed
by ``seq // journal_bucket_rows`` so a busy shard never grows one huge partition;
assignments are one small partition (a row per logical partition, <= a few
thousand rows) so that claiming several of them is one conditional batch.
"""

KEYSPACE = """
CREATE KEYSPACE IF NOT EXISTS {keyspace}
WITH replication = {replication} AND durable_writes = true
"""

TABLES = [
    "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text)",
    "CREATE TABLE IF NOT EXISTS profiles (user_id text PRIMARY KEY, blob blob)",
    # `trimmed` (static: one per bucket) marks a bucket whose rows a checkpoint has
    # made obsolete: appends into it are refused, so no writer can use a freed position.
    """CREATE TABLE IF NOT EXISTS journal (
        journal_id text, bucket bigint, seq bigint, blob blob, trimmed boolean static,
        PRIMARY KEY ((journal_id, bucket), seq)
    ) WITH CLUSTERING ORDER BY (seq ASC)""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        journal_id text PRIMARY KEY, seq bigint, meta blob, trimmed_to bigint)""",
    """CREATE TABLE IF NOT EXISTS assignments (
        deployment text, partition int, owner text, epoch bigint,
        PRIMARY KEY (deployment, partition))""",
    "CREATE TABLE IF NOT EXISTS items (item_id text PRIMARY KEY, blob blob)",
    "CREATE TABLE IF NOT EXISTS tombstones (user_id text PRIMARY KEY, deleted_at double)",
    # A shard's item signals: one partition per chunk, so no write grows with them.
    """CREATE TABLE IF NOT EXISTS signals (
        journal_id text, slot int, chunk int, blob blob,
        PRIMARY KEY ((journal_id, slot, chunk)))""",
    # Applied lines per (partition, source); rows expire with the dedup retention.
    "CREATE TABLE IF NOT EXISTS dedup (key text PRIMARY KEY, blob blob)",
    """CREATE TABLE IF NOT EXISTS quarantine (
        journal_id text, seq bigint, blob blob, reason text, quarantined_at double,
        PRIMARY KEY (journal_id, seq))""",
    # Model versions: the info row is written last (a listed version is whole); the
    # vectors in chunks of ~512 KiB, one partition each.
    "CREATE TABLE IF NOT EXISTS models (version text PRIMARY KEY, chunks int, info blob)",
    """CREATE TABLE IF NOT EXISTS model_chunks (
        version text, chunk int, blob blob, PRIMARY KEY ((version, chunk)))""",
    # The model log: every switch and rollback, one small partition (conditional
    # appends need that); the current version is replayed from it.
    # What recommendations showed, and which events answered them: partitioned by
    # the hour of their time and a slot of the key, so a partition holds one
    # hour's sixteenth of the traffic and a time range is read hour by hour. Rows
    # expire with the exposure retention (USING TTL).
    """CREATE TABLE IF NOT EXISTS exposures (
        hour bigint, slot int, rec_id text, at double, blob blob,
        PRIMARY KEY ((hour, slot), rec_id))""",
    """CREATE TABLE IF NOT EXISTS attributions (
        hour bigint, slot int, key text, at double, blob blob,
        PRIMARY KEY ((hour, slot), key))""",
    # The experiment log: one small partition, conditional appends (like the model log).
    """CREATE TABLE IF NOT EXISTS experiment_changes (
        deployment text, seq bigint, at double, blob blob, PRIMARY KEY (deployment, seq))""",
    """CREATE TABLE IF NOT EXISTS model_switches (
        deployment text, seq bigint, version text, rollback boolean, switched_at double,
        PRIMARY KEY (deployment, seq))""",
]

# The assignments table holds one deployment per keyspace; the key is a constant so
# that every assignment row lives in one partition (conditional batches need that).
DEPLOYMENT = "default"

GET_META = "SELECT value FROM meta WHERE key = ?"
INSERT_META_IF_ABSENT = "INSERT INTO meta (key, value) VALUES (?, ?) IF NOT EXISTS"

GET_PROFILES = "SELECT user_id, blob FROM profiles WHERE user_id IN ?"
PUT_PROFILE = "INSERT INTO profiles (user_id, blob) VALUES (?, ?)"
DELETE_PROFILE = "DELETE FROM profiles WHERE user_id = ?"
SCAN_PROFILES = "SELECT user_id, blob FROM profiles"

# A position is free if no row holds it and its bucket was never trimmed.
APPEND_JOURNAL = (
    "UPDATE journal SET blob = ? WHERE journal_id = ? AND bucket = ? AND seq = ? "
    "IF blob = null AND trimmed = null"
)
READ_JOURNAL_BUCKET = (
    "SELECT seq, blob FROM journal WHERE journal_id = ? AND bucket = ? AND seq > ? LIMIT ?"
)
MARK_BUCKET_TRIMMED = "UPDATE journal SET trimmed = true WHERE journal_id = ? AND bucket = ?"
DELETE_BUCKET_ROWS = "DELETE FROM journal WHERE journal_id = ? AND bucket = ? AND seq >= ?"
# Keyspaces made before the trimmed marker existed get the column.
ADD_TRIMMED_MARKER = "ALTER TABLE journal ADD trimmed boolean static"

GET_CHECKPOINT = "SELECT seq, meta, trimmed_to FROM checkpoints WHERE journal_id = ?"
PUT_CHECKPOINT = "UPDATE checkpoints SET seq = ?, meta = ? WHERE journal_id = ?"
SET_TRIMMED_TO = "UPDATE checkpoints SET trimmed_to = ? WHERE journal_id = ?"

GET_ASSIGNMENTS = "SELECT partition, owner, epoch FROM assignments WHERE deployment = ?"
GET_SOME_ASSIGNMENTS = (
    "SELECT partition, owner, epoch FROM assignments WHERE deployment = ? AND partition IN ?"
)
CLAIM_NEW_PARTITION = (
    "INSERT INTO assignments (deployment, partition, owner, epoch) VALUES (?, ?, ?, ?) "
    "IF NOT EXISTS"
)
CLAIM_PARTITION = (
    "UPDATE assignments SET owner = ?, epoch = ? WHERE deployment = ? AND partition = ? "
    "IF epoch = ?"
)

PUT_ITEM = "INSERT INTO items (item_id, blob) VALUES (?, ?)"
GET_ITEMS = "SELECT item_id, blob FROM items WHERE item_id IN ?"
SCAN_ITEMS = "SELECT item_id, blob FROM items"

PUT_TOMBSTONE = "INSERT INTO tombstones (user_id, deleted_at) VALUES (?, ?)"
GET_TOMBSTONES = "SELECT user_id, deleted_at FROM tombstones WHERE user_id IN ?"

PUT_SIGNALS = "INSERT INTO signals (journal_id, slot, chunk, blob) VALUES (?, ?, ?, ?)"
GET_SIGNALS = "SELECT blob FROM signals WHERE journal_id = ? AND slot = ? AND chunk = ?"

GET_DEDUP = "SELECT key, blob FROM dedup WHERE key IN ?"
PUT_DEDUP = "INSERT INTO dedup (key, blob) VALUES (?, ?) USING TTL ?"

PUT_QUARANTINE = (
    "INSERT INTO quarantine (journal_id, seq, blob, reason, quarantined_at) VALUES (?, ?, ?, ?, ?)"
)
GET_QUARANTINE = "SELECT seq, reason FROM quarantine WHERE journal_id = ?"

PUT_MODEL_CHUNK = "INSERT INTO model_chunks (version, chunk, blob) VALUES (?, ?, ?)"
GET_MODEL_CHUNK = "SELECT blob FROM model_chunks WHERE version = ? AND chunk = ?"
PUT_MODEL = "INSERT INTO models (version, chunks, info) VALUES (?, ?, ?) IF NOT EXISTS"
GET_MODEL = "SELECT chunks FROM models WHERE version = ?"
SCAN_MODELS = "SELECT version, info FROM models"
APPEND_MODEL_SWITCH = (
    "INSERT INTO model_switches (deployment, seq, version, rollback, switched_at) "
    "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
)
GET_MODEL_SWITCHES = (
    "SELECT seq, version, rollback, switched_at FROM model_switches WHERE deployment = ?"
)

# Slots per hour of the exposures and attributions tables.
TIMED_SLOTS = 16
PUT_EXPOSURE = (
    "INSERT INTO exposures (hour, slot, rec_id, at, blob) VALUES (?, ?, ?, ?, ?) USING TTL ?"
)
SCAN_EXPOSURES = "SELECT rec_id, at, blob FROM exposures WHERE hour = ? AND slot = ?"
PUT_ATTRIBUTION = (
    "INSERT INTO attributions (hour, slot, key, at, blob) VALUES (?, ?, ?, ?, ?) USING TTL ?"
)
SCAN_ATTRIBUTIONS = "SELECT key, at, blob FROM attributions WHERE hour = ? AND slot = ?"
APPEND_EXPERIMENT_CHANGE = (
    "INSERT INTO experiment_changes (deployment, seq, at, blob) VALUES (?, ?, ?, ?) IF NOT EXISTS"
)
GET_EXPERIMENT_CHANGES = "SELECT seq, at, blob FROM experiment_changes WHERE deployment = ?"

KEYSPACE_REPLICATION = "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?"
