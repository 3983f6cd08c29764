"""Serving an app from a background thread of this process (tests, benchmarks, notebooks):

    with serve_in_thread(create_app(scheduler)) as url:      # http://127.0.0.1:<free port>
        ...

uvicorn runs in a daemon thread on a socket bound here (port 0: the OS picks a free one, so there is no race
between finding a port and binding it); leaving the block asks uvicorn to exit and waits for it.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0,
                    shutdown_timeout_s: float = 30.0, log_level: str = "warning"):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llama-fast-uvicorn",
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server did not start within {startup_timeout_s} s")
            time.sleep(0.01)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=shutdown_timeout_s)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"the server did not shut down within {shutdown_timeout_s} s")
