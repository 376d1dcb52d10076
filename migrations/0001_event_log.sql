-- The event log, its idempotency record and the projections derived from it.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per event. seq is the global sequence (1, 2, 3 ... no gaps), version the
-- per-stream one. order_id and owner are derived at append time (the order an event
-- concerns and that order's customer) so that per-order and per-customer feeds are
-- index lookups; they are not part of the hashed event.
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY,
    stream     TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    type       TEXT    NOT NULL,
    at         TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    command_id TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    hash       TEXT    NOT NULL,
    order_id   TEXT,
    owner      TEXT
);
CREATE UNIQUE INDEX events_stream_version ON events (stream, version);
CREATE INDEX events_stream_seq ON events (stream, seq);
CREATE INDEX events_order_seq ON events (order_id, seq) WHERE order_id IS NOT NULL;
CREATE INDEX events_owner_seq ON events (owner, seq) WHERE owner IS NOT NULL;
CREATE INDEX events_actor_seq ON events (actor, seq);

CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'orderlog: events are append-only (UPDATE refused)');
END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'orderlog: events are append-only (DELETE refused)');
END;

-- Idempotency: the outcome of every accepted command, per (actor, command id).
CREATE TABLE commands (
    actor      TEXT    NOT NULL,
    command_id TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    events     TEXT    NOT NULL,
    PRIMARY KEY (actor, command_id)
) WITHOUT ROWID;

-- Projections, updated in the same transaction as the append; meta.projection_seq is
-- the last seq folded into them.
CREATE TABLE orders (
    order_id   TEXT PRIMARY KEY,
    customer   TEXT    NOT NULL,
    status     TEXT    NOT NULL,
    items      TEXT    NOT NULL,
    ship_to    TEXT,
    note       TEXT,
    version    INTEGER NOT NULL,
    created_at TEXT    NOT NULL,
    updated_at TEXT    NOT NULL,
    last_seq   INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE stock (
    sku       TEXT PRIMARY KEY,
    name      TEXT,
    available INTEGER NOT NULL,
    reserved  INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL
) WITHOUT ROWID;
