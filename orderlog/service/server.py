"""Running the service: listeners (plain or TLS), the writer and sweep tasks, signals and the
orderly shutdown (1001 to every connection, the writer drained, the WAL checkpointed)."""

from __future__ import annotations

import logging
import signal
import ssl

import trio

from ..store import display_name
from . import logs
from .app import WS_PATH, Service
from .connection import GOING_AWAY
from .settings import Settings

log = logging.getLogger("orderlog")

# Shutdown stays within 10 s (PROTOCOL.md): answering the commands received, then the closes,
# then the writer's last turn (3 s).
DRAIN_TIMEOUT = 2.0
CLOSE_ALL_TIMEOUT = 4.0

# -- running the server ------------------------------------------------------------------------


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve(settings: Settings, *, stop: trio.Event | None = None, handle_signals: bool = True,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the service until `stop` is set or SIGINT/SIGTERM arrives; `task_status.started(url)`
    once listening. Then: stop accepting, close every connection with 1001, let the writer
    finish what it was handed, checkpoint the WAL and return."""
    _raise_fd_limit(settings.max_connections + 64)
    service = Service(settings)
    try:
        await _serve(service, stop if stop is not None else trio.Event(), handle_signals, task_status)
    finally:
        service.close()


async def _serve(service: Service, stop: trio.Event, handle_signals: bool, task_status) -> None:
    settings = service.settings
    context = ssl_context(settings)
    async with trio.open_nursery() as outer:
        await outer.start(service.writer)
        outer.start_soon(service.sweep)
        if handle_signals:
            outer.start_soon(_wait_for_signal, stop)
        async with trio.open_nursery() as connections:
            listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
            if context is not None:
                listeners = [trio.SSLListener(l, context, https_compatible=True) for l in listeners]
            listen_scope = trio.CancelScope()

            async def run_listener(task_status=trio.TASK_STATUS_IGNORED):
                with listen_scope:
                    await trio.serve_listeners(service.handle_tcp, listeners, handler_nursery=connections,
                                               task_status=task_status)

            await connections.start(run_listener)
            port = listeners[0].socket.getsockname()[1] if context is None else listeners[0].transport_listener.socket.getsockname()[1]
            scheme = "wss" if context is not None else "ws"
            url = f"{scheme}://{_url_host(settings.host)}:{port}{WS_PATH}"
            log.info("event=listening url=%s log_id=%s head=%d db=%s", url, service.log_id, service.hub.head,
                     display_name(settings.db))
            task_status.started(url)
            await stop.wait()
            # Stop accepting connections and commands, let the writer commit and answer what it
            # holds, close every connection with 1001, then let the writer finish.
            service.stopping = True
            listen_scope.cancel()
            with trio.move_on_after(DRAIN_TIMEOUT):
                await service.drain_commands()
            with trio.move_on_after(CLOSE_ALL_TIMEOUT):
                await service.close_all(GOING_AWAY, "server shutting down")
            connections.cancel_scope.cancel()
        await service._send_commands.aclose()
        with trio.move_on_after(3):
            while service.writer_alive:
                await trio.sleep(0.01)
        outer.cancel_scope.cancel()
    logs.flush_suppressed()
    log.info("event=stopped head=%d", service.hub.head)


async def _wait_for_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("event=shutdown signal=%s", signal.Signals(signum).name)
            stop.set()
            return


def _raise_fd_limit(wanted: int) -> None:
    """Let the process hold `wanted` sockets if the hard limit allows (the soft one is often 1024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
