-- Fewer index writes per appended event (each index is a B-tree insert per row).
--
-- events_stream_version duplicated events_stream_seq: within a stream, version order is seq
-- order, and every stream lookup goes by (stream, seq). The single writer assigns versions in
-- its transaction and `orderlog verify` checks their continuity, so the UNIQUE constraint
-- guarded nothing else.
DROP INDEX events_stream_version;

-- owner is looked up only for a customer's `orders` feed, whose events are all on order
-- streams: stock moves (which also carry an owner) need not be in this index.
DROP INDEX events_owner_seq;
CREATE INDEX events_owner_seq ON events (owner, seq) WHERE owner IS NOT NULL AND substr(stream, 1, 6) = 'order:';
