"""The trio shell: the only code that runs trio and trio-websocket.

- `settings`: what `orderlog serve` can be told (plain data; loads no trio).
- `server`: the service, the writer pipeline, the hub, connections and `serve`.
- `sockets`: the per-connection socket writer and the stream trio-websocket reads through.
- `http`: plain HTTP on the WebSocket port (health, metrics, the dashboard).
- `metrics`, `gcpolicy`: Prometheus metrics; the garbage collector's policy for a server.
- `logs`: the log lines, every value quoted (text or JSON), repeated kinds throttled (loads no trio).
"""
