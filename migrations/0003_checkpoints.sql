-- Signed checkpoints (orderlog/checkpoint.py): the compact JWS that `orderlog serve
-- --checkpoint-key` signs every N events, kept so that the newest survives a restart and
-- GET /v1/checkpoint can serve it. They prove something only in copies kept outside the shop
-- (docs/operations.md); the copy here is a convenience.
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY,
    jws TEXT    NOT NULL
);
