"""orderlog: an event-sourced pet-store order service with a live WebSocket feed."""

from .domain import (
    Command,
    Event,
    NewEvent,
    Order,
    Principal,
    Rejected,
    State,
    Stock,
    decide,
    evolve,
    fold,
)
from .records import Ack, Filter, Request

__version__ = "0.1.0"

__all__ = [
    "Ack", "Command", "Event", "Filter", "NewEvent", "Order", "Principal", "Rejected", "Request",
    "State", "Stock", "decide", "evolve", "fold",
]
