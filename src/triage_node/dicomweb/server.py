"""The HTTP(S) server of the STOW-RS receiver: cheroot, CherryPy's threaded WSGI server.

Why cheroot: a well-kept, pure-Python HTTP/1.1 server with a fixed thread pool (a blocking
fsync per instance suits threads), request and header timeouts, keep-alive, and TLS through
Python's own ``ssl`` — with the node's TLS context (TLS 1.2 or newer; client certificates
required when ``dicomweb.tls_verify_client`` is set), so HTTPS needs no proxy in front.
"""

from __future__ import annotations

import errno
import ssl
import threading
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from triage_node.config import DicomwebConfig
from triage_node.dicomweb.stow import StowApplication
from triage_node.errors import TriageError


def tls_context(config: DicomwebConfig) -> ssl.SSLContext:
    """The server context of ``[dicomweb]``; TriageError naming the file that does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
        if config.tls_verify_client:
            context.load_verify_locations(cafile=str(config.tls_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TriageError(
            f"dicomweb: cannot load the TLS files ({config.tls_cert_file}, "
            f"{config.tls_key_file}, {config.tls_ca_file}): {getattr(exc, 'strerror', None) or exc}"
        ) from None
    return context


class _ClosingGateway(wsgi.Gateway_10):
    """cheroot's WSGI 1.0 gateway, except that a response saying ``Connection: close`` closes
    the connection at once. cheroot otherwise reads and discards the rest of a request body the
    application refused (RFC 7230 6.6's courtesy), which for a refused 2 GB upload means
    taking it all in."""

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        write = super().start_response(status, headers, exc_info)
        if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
            self.req.close_connection = True
        return write


class StowServer:
    """The STOW-RS receiver on ``dicomweb.bind:port``, serving in a thread pool."""

    def __init__(self, config: DicomwebConfig, app: StowApplication) -> None:
        self.config = config
        self.server = wsgi.Server(
            (config.bind, config.port),
            app,
            numthreads=config.threads,
            timeout=int(config.timeout),
            server_name="triage-node",
        )
        self.server.max_request_body_size = 0  # the application answers 413 itself
        self.server.gateway = _ClosingGateway
        if config.tls_cert_file is not None:
            adapter = BuiltinSSLAdapter(str(config.tls_cert_file), str(config.tls_key_file))
            adapter.context = tls_context(config)
            self.server.ssl_adapter = adapter
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.bind_addr[1])

    def start(self) -> StowServer:
        """Bind (a clear TriageError when the port is taken) and serve in the background."""
        try:
            self.server.prepare()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TriageError(
                    f"DICOMweb port {self.config.port} on {self.config.bind} is already in use"
                ) from None
            raise TriageError(
                f"cannot listen for DICOMweb on {self.config.bind}:{self.config.port}: "
                f"{exc.strerror or exc}"
            ) from None
        self._thread = threading.Thread(target=self.server.serve, name="stow-rs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        if self._thread is not None:
            self._thread.join(10)
