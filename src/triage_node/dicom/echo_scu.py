"""Verification SCU (PS3.4 Annex A): C-ECHO the node's own listener and the PACS it sends
to, for ``triage-node status`` and the tests' readiness checks."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triage_node.dicom.identity import node_ae
from triage_node.domain import Destination, TlsFiles

ECHO_AE_TITLE = "TRIAGE_STATUS"  # the calling AE title of a C-ECHO to the node itself


def _c_echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout: float,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> tuple[str, float | None, str]:
    """One C-ECHO: (``"ok"``, ``"failed"``, ``"rejected"`` or ``"silent"``, ms, detail)."""
    ae = node_ae(calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    started = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        code = getattr(status, "Status", None)
        if code == 0x0000:
            return "ok", elapsed, "C-ECHO success"
        return "failed", elapsed, f"C-ECHO status {code}"
    if assoc.is_rejected:
        return "rejected", elapsed, "association rejected"
    return "silent", None, "no DICOM answer"


def echo_listener(host: str, port: int, called_ae: str, timeout: float) -> dict[str, Any]:
    """C-ECHO the node's own listener. A rejected association still proves it is listening."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return {
            "reachable": False,
            "echo_ms": None,
            "detail": f"cannot connect: {exc.strerror or exc}",
        }
    outcome, elapsed, detail = _c_echo(host, port, called_ae, ECHO_AE_TITLE, timeout)
    if outcome == "rejected":
        detail = "answered with A-ASSOCIATE-RJ (this host or AE title is not allowed)"
    return {"reachable": outcome in ("ok", "rejected"), "echo_ms": elapsed, "detail": detail}


def echo_destination(
    destination: Destination, calling_ae: str, tls: TlsFiles, timeout: float
) -> dict[str, Any]:
    """C-ECHO a PACS the node sends results to, as the node (its AE title, its TLS settings).
    Unlike the node's own listener, a rejected association is a failure here."""
    tls_args = None
    if destination.tls:
        try:
            tls_args = (tls.context(), destination.host)
        except (OSError, ssl.SSLError) as exc:
            return {"reachable": False, "echo_ms": None, "detail": f"TLS set-up failed: {exc}"}
    outcome, elapsed, detail = _c_echo(
        destination.host, destination.port, destination.ae_title, calling_ae, timeout, tls_args
    )
    return {"reachable": outcome == "ok", "echo_ms": elapsed, "detail": detail}
