"""Prometheus metrics of one running service (its own registry, so tests can run several)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..domain import COMMANDS

CONTENT_TYPE = CONTENT_TYPE_LATEST


def channel_kind(channel: str) -> str:
    """A bounded label for a channel name (`order:<id>` -> `order`)."""
    return "order" if channel.startswith("order:") else channel


class Metrics:
    def __init__(self, head: Callable[[], int], lag: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("orderlog_connections", "Open WebSocket connections (authenticated or not)",
                                 registry=r)
        self.subscriptions = Gauge("orderlog_subscriptions", "Open subscriptions by channel kind", ["channel"],
                                   registry=r)
        self.commands = Counter("orderlog_commands_total", "Commands answered, by name and outcome (ack, duplicate "
                                "or the error code)", ["name", "outcome"], registry=r)
        self.events = Counter("orderlog_events_appended_total", "Events appended by this server", registry=r)
        self.batch_size = Histogram("orderlog_batch_size", "Commands per group commit", registry=r,
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
        self.commit_seconds = Histogram("orderlog_commit_seconds", "Time to decide and commit one batch",
                                        registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2))
        head_gauge = Gauge("orderlog_head_seq", "Seq of the newest committed event", registry=r)
        head_gauge.set_function(head)
        lag_gauge = Gauge("orderlog_subscriber_lag_events", "Largest number of committed events a subscription "
                          "has not yet been sent", registry=r)
        lag_gauge.set_function(lag)
        for kind in ("orders", "inventory", "order"):
            self.subscriptions.labels(kind)
        self._command_children: dict[tuple[str, str], Counter] = {}

    def command(self, name: str, outcome: str) -> None:
        key = (name if name in COMMANDS else "unknown", outcome)
        child = self._command_children.get(key)
        if child is None:
            # Bounded: the names are COMMANDS or "unknown", the outcomes a fixed set of codes.
            child = self._command_children[key] = self.commands.labels(*key)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
