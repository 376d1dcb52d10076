-- The event log on PostgreSQL: the same tables as the SQLite log (migrations/0001 and 0002),
-- plus log_head, the row that serializes appends.
--
-- Text columns use the "C" collation, so that ORDER BY and comparisons go by bytes exactly as
-- SQLite's do (and prefix matches can use the indexes).

CREATE TABLE meta (
    key   text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);

-- The newest event's seq and hash (0 and '' for an empty log). Every append transaction
-- locks this one row first (SELECT ... FOR UPDATE) and updates it before committing, so
-- appends from any number of nodes take turns: seq order is commit order, and a reader that
-- reads `seq > last` never misses an event that commits late.
CREATE TABLE log_head (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq  bigint  NOT NULL,
    hash text    NOT NULL
);
INSERT INTO log_head (id, seq, hash) VALUES (true, 0, '');

-- One row per event (see the SQLite migration for the meaning of each column).
CREATE TABLE events (
    seq        bigint PRIMARY KEY,
    stream     text COLLATE "C" NOT NULL,
    version    bigint NOT NULL,
    type       text COLLATE "C" NOT NULL,
    at         text COLLATE "C" NOT NULL,
    actor      text COLLATE "C" NOT NULL,
    command_id text COLLATE "C" NOT NULL,
    data       text NOT NULL,  -- canonical JSON, kept as text so that its bytes (and the hash) never change
    hash       text COLLATE "C" NOT NULL,
    order_id   text COLLATE "C",
    owner      text COLLATE "C"
);
CREATE INDEX events_stream_seq ON events (stream, seq);
CREATE INDEX events_order_seq ON events (order_id, seq) WHERE order_id IS NOT NULL;
CREATE INDEX events_owner_seq ON events (owner, seq) WHERE owner IS NOT NULL AND starts_with(stream, 'order:');
CREATE INDEX events_actor_seq ON events (actor, seq);

CREATE FUNCTION orderlog_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'orderlog: events are append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION orderlog_append_only();
CREATE TRIGGER events_append_only_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION orderlog_append_only();

-- Idempotency: the outcome of every accepted command, per (actor, command id).
CREATE TABLE commands (
    actor      text COLLATE "C" NOT NULL,
    command_id text COLLATE "C" NOT NULL,
    seq        bigint NOT NULL,
    version    bigint NOT NULL,
    events     text NOT NULL,
    PRIMARY KEY (actor, command_id)
);

-- Projections, updated in the same transaction as the append; meta.projection_seq is the last
-- seq folded into them.
CREATE TABLE orders (
    order_id   text COLLATE "C" PRIMARY KEY,
    customer   text COLLATE "C" NOT NULL,
    status     text COLLATE "C" NOT NULL,
    items      text NOT NULL,
    ship_to    text,
    note       text,
    version    bigint NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    last_seq   bigint NOT NULL
);

CREATE TABLE stock (
    sku       text COLLATE "C" PRIMARY KEY,
    name      text,
    available bigint NOT NULL,
    reserved  bigint NOT NULL,
    version   bigint NOT NULL,
    last_seq  bigint NOT NULL
);
