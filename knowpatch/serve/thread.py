"""An app served by uvicorn on a thread of this process (for `bench-serve` and the tests:
a real HTTP server on 127.0.0.1 without a subprocess)."""

from __future__ import annotations

import socket
import threading
import time

from fastapi import FastAPI


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InThread:
    """An app served by uvicorn on a thread of this process, on a free loopback port (for
    `bench-serve` and the tests: a real HTTP server without a subprocess)."""

    def __init__(self, app: FastAPI, timeout: float = 60.0):
        import uvicorn

        self.port = free_port()
        self.app, self.base = app, f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
