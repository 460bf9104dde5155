"""Prometheus ``/metrics``: the figures of ``triage-node status``, computed when scraped.

Each scrape runs the same checks as the command (C-ECHO of the listener and destinations,
database totals), so the two never disagree. Served by prometheus-client's own HTTP server on
``service.metrics_bind:service.metrics_port`` when that port is not 0.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from triage_node.config import Config
from triage_node.ops.status import collect_status

PREFIX = "triage_node"
SCRAPE_TIMEOUT_SECONDS = 2.0


def _gauge(name: str, doc: str, value: float | None, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), float(value))
    return family


def _by_label(name: str, doc: str, label: str, values: dict[str, Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family


def metric_families(report: dict[str, Any]) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
    """The status report as metric families (names documented in docs/admin-guide.md)."""
    yield _gauge("healthy", "1 when triage-node status finds no problem", report["healthy"])
    yield _gauge(
        "problems", "number of problems triage-node status reports", len(report["problems"])
    )
    yield _gauge(
        "listener_up", "the DICOM listener answers C-ECHO", report["listener"]["reachable"]
    )
    if "tls_listening" in report["listener"]:
        yield _gauge(
            "tls_listener_up",
            "the DICOM TLS port accepts connections",
            report["listener"]["tls_listening"],
        )
    yield _gauge("database_up", "the database can be reached", report["database"]["reachable"])
    spool = report["spool"]
    yield _gauge("spool_bytes", "bytes of received instances in the spool", spool["bytes"])
    yield _gauge(
        "disk_free_bytes", "free bytes on the spool's file system", spool["disk_free_bytes"]
    )
    model = report["model"]
    info = InfoMetricFamily(f"{PREFIX}_model", "the configured model", labels=[])
    if model["ok"]:
        providers = ",".join(model.get("providers", []))
        info.add_metric(
            [], {"name": model["name"], "version": model["version"], "providers": providers}
        )
    yield info
    yield _gauge("model_ok", "the configured model directory is usable", model["ok"])
    if "service" not in report:
        return
    yield _gauge("service_up", "the service sent a recent heartbeat", report["service"]["running"])
    yield _gauge("workers", "analysis workers running", len(report["workers"]))
    yield _by_label("studies", "studies by priority state", "state", report["priority"])
    yield _by_label("jobs", "analysis jobs by state", "state", report["jobs"])
    queue = report["queue"]
    yield _gauge("queue_depth", "analysis jobs waiting", queue["queued"])
    yield _gauge(
        "queue_oldest_age_seconds",
        "age of the oldest waiting job",
        queue["oldest_queued_age_s"] or 0,
    )
    yield _gauge("instances", "instances received and kept", report["instances"]["count"])
    yield _gauge("associations_open", "DICOM associations open now", report["associations_open"])
    retention = report["retention"]
    yield _gauge(
        "instances_on_disk", "received instances not yet purged", retention["instances_on_disk"]
    )
    yield _gauge(
        "retention_purged_studies",
        "studies whose spooled files retention removed (last priority_days)",
        retention["studies_purged"],
    )
    yield _gauge(
        "retention_last_run_age_seconds",
        "time since retention last ran",
        retention["last_run_age_s"],
    )
    yield _gauge("failed_jobs", "analysis jobs that gave up", report["failed"]["jobs"])
    yield _gauge("outbox_dead", "result objects that gave up", report["failed"]["outbox_dead"])
    unreported = report["unreported_positives"]
    yield _gauge("unreported_positives", "flagged studies nobody has reported", unreported["total"])
    yield _gauge(
        "unreported_positive_oldest_age_seconds",
        "time since the oldest unreported positive was flagged",
        unreported["oldest_age_s"] or 0,
    )
    up = GaugeMetricFamily(
        f"{PREFIX}_destination_up", "the destination answers C-ECHO", labels=["destination"]
    )
    outbox = GaugeMetricFamily(
        f"{PREFIX}_outbox_items",
        "result objects by destination and state",
        labels=["destination", "state"],
    )
    for destination in report["destinations"]:
        name = destination["destination"]
        up.add_metric([name], float(destination["reachable"]))
        for state, count in destination["outbox"].items():
            outbox.add_metric([name, state], float(count))
    yield up
    yield outbox


class StatusCollector(Collector):
    """Builds the metrics from a fresh status report at every scrape."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()  # one status check at a time, however many scrapers

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        with self._lock:
            report = collect_status(self.config, timeout=SCRAPE_TIMEOUT_SECONDS)
        yield from metric_families(report)


def start_metrics_server(config: Config) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics``; returns prometheus-client's (server, thread) to shut it down."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(config))
    server, thread = start_http_server(
        config.service.metrics_port, addr=config.service.metrics_bind, registry=registry
    )
    return server, thread
