"""The web interface's server: uvicorn (the ASGI reference server) on a socket the node binds
itself, in a thread of the supervisor process, so a port in use is a clear error at start-up.
HTTPS when ``web.tls_cert_file`` is set; otherwise plain HTTP, for loopback behind a reverse
proxy that terminates TLS (docs/admin-guide.md)."""

from __future__ import annotations

import socket
import threading

import uvicorn

from triage_node.config import WebConfig
from triage_node.errors import TriageError
from triage_node.web.app import WebApp


def bind_web_socket(config: WebConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.bind, config.port))
    except OSError as exc:
        sock.close()
        raise TriageError(
            f"cannot listen for the web interface on {config.bind}:{config.port}: "
            f"{exc.strerror or exc}"
        ) from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


class WebServer:
    """uvicorn serving a :class:`WebApp` until :meth:`stop`."""

    def __init__(self, config: WebConfig, app: WebApp) -> None:
        self.socket = bind_web_socket(config)
        self.port = int(self.socket.getsockname()[1])
        self.server = uvicorn.Server(
            uvicorn.Config(
                app.asgi(),
                log_config=None,  # the node's own logging; no access log (paths hold study UIDs)
                access_log=False,
                lifespan="off",
                ssl_certfile=config.tls_cert_file,
                ssl_keyfile=config.tls_key_file,
                server_header=False,
                timeout_keep_alive=30,
                limit_concurrency=200,
                h11_max_incomplete_event_size=64 * 1024,
            )
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="web", daemon=True
        )

    def start(self) -> WebServer:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()
