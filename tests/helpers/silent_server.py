"""A TCP server on 127.0.0.1 that accepts connections and never sends a byte: a network that hangs."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class SilentServer:
    """``with SilentServer() as server:`` listens on ``server.url`` until the block ends (or ``lifetime`` s pass).

    Every connection is accepted and held open without an answer, like a firewall or a broken proxy that
    swallows traffic. Leaving the block closes the listener and every connection.
    """

    def __init__(self, lifetime: float = 120.0) -> None:
        self.lifetime = lifetime
        self.connections: list[socket.socket] = []
        self.port = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SilentServer:
        self._listener.bind(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._listener.listen(32)
        self._listener.settimeout(0.1)
        self._thread.start()
        return self

    def _serve(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections.append(conn)  # kept open, never answered

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for conn in self.connections:
            conn.close()
