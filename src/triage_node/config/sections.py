"""The configuration's sections: one frozen dataclass per ``[section]`` of the file, each
setting with its default, check and description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from triage_node.config.checks import (
    _ae_title,
    _ae_titles,
    _base_path,
    _between,
    _db_url,
    _destinations,
    _hashes,
    _hl7_fields,
    _host_port,
    _list_setting,
    _log_format,
    _log_level,
    _networks,
    _one_destination,
    _setting,
    _transport,
    _unlabelled,
    _users,
)
from triage_node.domain import Destination, TlsFiles, WebDestination, parse_destination


@dataclass(frozen=True)
class DicomConfig:
    """``[dicom]``: the DICOM listener (the node as a storage and verification SCP)."""

    ae_title: str = _setting("TRIAGE_NODE", _ae_title, "AE title the node answers to")
    bind: str = _setting("0.0.0.0", None, "address to listen on")  # noqa: S104 - a DICOM node
    port: int = _setting(11112, _between(1, 65535), "TCP port to listen on")
    require_called_ae: bool = _setting(True, None, "reject associations to another AE title")
    allowed_calling_aes: list[str] = _list_setting(
        _ae_titles, "calling AE titles allowed to associate; empty allows any"
    )
    allowed_networks: list[str] = _list_setting(
        _networks, "source addresses/networks allowed to connect; empty allows any"
    )
    transport: str = _setting(
        "auto",
        _transport,
        "DICOM transport of the plain port: dcmtk (DCMTK's receiver, faster; built at the first "
        "start, needs g++ and libdcmtk-dev), pynetdicom, or auto: dcmtk where the system has "
        "what it needs, else pynetdicom (the TLS port stays on pynetdicom)",
    )
    receivers: int = _setting(0, _between(0, 64), "receiver processes; 0 = one per CPU core")
    max_associations: int = _setting(32, _between(1, 1000), "concurrent associations per receiver")
    max_associations_per_address: int = _setting(
        8,
        _between(1, 1000),
        "concurrent connections per receiver from one source address (reserved networks: any)",
    )
    reserved_networks: list[str] = _list_setting(
        _networks, "source networks (the PACS) that may use the reserved association slots"
    )
    reserved_associations: int = _setting(
        8,
        _between(0, 1000),
        "of max_associations, the slots only reserved_networks may use (when it is set)",
    )
    request_timeout: float = _setting(
        5.0,
        _between(0.1, 600),
        "seconds from connection to a complete A-ASSOCIATE-RQ (a trickle does not extend it)",
    )
    max_pdu_size: int = _setting(
        0, _between(0, 2**32 - 1), "maximum PDU length offered to peers; 0 = unlimited"
    )
    acse_timeout: float = _setting(30.0, _between(1, 3600), "seconds to wait for ACSE messages")
    dimse_timeout: float = _setting(60.0, _between(1, 3600), "seconds to wait for DIMSE messages")
    network_timeout: float = _setting(
        30.0, _between(1, 86400), "seconds an idle association is kept (then released)"
    )
    tls_port: int = _setting(
        0, _between(0, 65535), "DICOM TLS port (PS3.15 B.1; 2762 is usual); 0 = no TLS listener"
    )
    tls_cert_file: Path | None = _setting(
        None, None, "the node's server certificate chain (PEM) for the TLS port"
    )
    tls_key_file: Path | None = _setting(None, None, "private key (PEM) of tls_cert_file")
    tls_ca_file: Path | None = _setting(
        None, None, "CA certificates (PEM) that sign the client certificates accepted"
    )
    tls_verify_client: bool = _setting(
        False, None, "TLS port: require a client certificate signed by tls_ca_file"
    )


@dataclass(frozen=True)
class DicomwebConfig:
    """``[dicomweb]``: the STOW-RS receiver (PS3.18 10.5), off unless a port is set."""

    port: int = _setting(0, _between(0, 65535), "HTTP(S) port of the STOW-RS receiver; 0 = off")
    bind: str = _setting("0.0.0.0", None, "address to listen on")  # noqa: S104
    base_path: str = _setting(
        "/dicom-web", _base_path, "path the DICOMweb resources start at ({base}/studies)"
    )
    tokens: list[str] = _list_setting(
        _hashes, "hashes of the bearer tokens that may store ('triage-node hash-secret')"
    )
    users: list[str] = _list_setting(
        _users, "HTTP Basic users that may store, as NAME:HASH ('triage-node hash-secret')"
    )
    allow_anonymous: bool = _setting(
        False, None, "store requests without credentials (only on a closed network)"
    )
    allowed_networks: list[str] = _list_setting(
        _networks, "source addresses/networks allowed to connect; empty allows any"
    )
    max_request_mb: int = _setting(
        1024, _between(1, 2**20), "largest request body accepted (413 above it), in MB"
    )
    threads: int = _setting(8, _between(1, 256), "requests served at once")
    timeout: float = _setting(
        30.0, _between(1, 3600), "seconds a connection may stay silent mid-request"
    )
    tls_cert_file: Path | None = _setting(
        None, None, "server certificate chain (PEM): HTTPS instead of HTTP"
    )
    tls_key_file: Path | None = _setting(None, None, "private key (PEM) of tls_cert_file")
    tls_ca_file: Path | None = _setting(
        None, None, "CA certificates (PEM) that sign the client certificates accepted"
    )
    tls_verify_client: bool = _setting(
        False, None, "require a client certificate signed by tls_ca_file (mutual TLS)"
    )


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the web interface (worklist, study pages, dashboard), off unless a port is
    set. Users are kept in the database ('triage-node users add')."""

    port: int = _setting(0, _between(0, 65535), "HTTP(S) port of the web interface; 0 = off")
    bind: str = _setting("127.0.0.1", None, "address to listen on (loopback: behind a proxy)")
    allowed_networks: list[str] = _list_setting(
        _networks, "source addresses/networks allowed to connect; empty allows any"
    )
    tls_cert_file: Path | None = _setting(
        None, None, "server certificate chain (PEM): HTTPS instead of HTTP"
    )
    tls_key_file: Path | None = _setting(None, None, "private key (PEM) of tls_cert_file")
    secure_cookies: bool = _setting(
        True,
        None,
        "mark the session cookie Secure (sent over HTTPS only; browsers also allow localhost)",
    )
    session_idle_minutes: int = _setting(
        30, _between(1, 24 * 60), "a session ends after this long without a request"
    )
    session_max_hours: int = _setting(
        12, _between(1, 24 * 7), "a session ends this long after sign-in, however active"
    )
    login_attempts: int = _setting(
        5, _between(1, 100), "failed sign-ins (per user and per address) before a lock-out"
    )
    lockout_minutes: int = _setting(
        15, _between(1, 24 * 60), "how long a lock-out lasts (doubling on each further failure)"
    )
    refresh_seconds: float = _setting(
        2.0, _between(0.5, 300), "how often an open worklist asks for changes"
    )
    image_cache_mb: int = _setting(
        64, _between(0, 2**16), "memory for rendered thumbnails (source images and heatmaps)"
    )


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: where received data lives."""

    data_dir: Path = _setting(Path("var"), None, "directory for the spool and embedded database")
    spool_dir: Path | None = _setting(None, None, "spool directory; default DATA_DIR/spool")
    min_free_mb: int = _setting(
        1024, _between(0, 2**40), "refuse instances (status A700) below this much free disk"
    )

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: SQLite (embedded default) or PostgreSQL."""

    url: str = _setting(
        "", _db_url, "SQLAlchemy URL; empty = SQLite file DATA_DIR/triage-node.sqlite3"
    )
    auto_upgrade: bool = _setting(True, None, "apply schema migrations when the service starts")
    busy_timeout: float = _setting(
        30.0,
        _between(0.1, 600),
        "seconds a writer waits for the database's write lock held by another process",
    )


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: when a study counts as complete."""

    settle_seconds: float = _setting(
        0.5,
        _between(0, 3600),
        "quiet time after the last instance (and its association's end) before a study is queued",
    )
    stale_association_seconds: float = _setting(
        300.0,
        _between(1, 86400),
        "an open association silent this long no longer holds its studies back",
    )


@dataclass(frozen=True)
class ServiceConfig:
    """``[service]``: the long-running service."""

    poll_seconds: float = _setting(
        5.0,
        _between(0.05, 600),
        "safety-net sweep for settled studies (an association's end starts its settle timer)",
    )
    heartbeat_seconds: float = _setting(
        5.0, _between(0.5, 600), "how often the service records that it is alive"
    )
    shutdown_grace_seconds: float = _setting(
        30.0, _between(0, 3600), "on SIGTERM, time given to associations in progress"
    )
    metrics_port: int = _setting(
        0, _between(0, 65535), "Prometheus /metrics HTTP port; 0 = no metrics endpoint"
    )
    metrics_bind: str = _setting("127.0.0.1", None, "address the metrics endpoint listens on")
    stuck_queue_seconds: float = _setting(
        600.0, _between(1, 604800), "status is unhealthy when a job has waited this long"
    )


@dataclass(frozen=True)
class WorkerConfig:
    """``[worker]``: analysis workers (in ``serve``, or alone with ``triage-node worker``)."""

    count: int = _setting(1, _between(0, 64), "worker processes; 0 = receive only")
    model_dir: Path = _setting(
        Path("models/fracture-v5"), None, "model directory (manifest.json and model.onnx)"
    )
    unlabelled_images: str = _setting(
        "analyse",
        _unlabelled,
        "images whose header names no body part: 'analyse' (the model's image guard decides) "
        "or 'skip'",
    )
    intra_op_threads: int = _setting(
        0, _between(0, 256), "ONNX Runtime threads per worker; 0 = one per core"
    )
    max_batch: int = _setting(8, _between(1, 256), "images of a study run together")
    lease_seconds: float = _setting(
        60.0, _between(5, 3600), "a job of a worker silent this long goes back to the queue"
    )
    max_attempts: int = _setting(3, _between(1, 100), "attempts before a job is failed")
    retry_backoff_seconds: float = _setting(
        10.0, _between(0, 86400), "wait before the first retry; doubles each attempt"
    )
    poll_seconds: float = _setting(
        5.0,
        _between(0.05, 600),
        "safety-net sweep of an idle worker (a queued study wakes the workers of its host)",
    )
    model_retry_seconds: float = _setting(
        30.0, _between(0.1, 3600), "while the model is missing or damaged, how often to try again"
    )


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: sending the result objects (SR, heatmap SC, KOS) to the PACS."""

    destinations: list[str] = _list_setting(
        _destinations,
        "where results go: AE_TITLE@host:port (C-STORE) or an http(s):// DICOMweb base URL "
        "(STOW-RS); empty = keep them only",
    )
    interval_seconds: float = _setting(
        5.0,
        _between(0.05, 3600),
        "how often the outbox is looked at for retries (new results are sent at once)",
    )
    timeout_seconds: float = _setting(
        30.0, _between(1, 3600), "connection and response timeout per association"
    )
    max_attempts: int = _setting(12, _between(1, 1000), "attempts before an item is dead")
    retry_backoff_seconds: float = _setting(
        10.0, _between(0, 86400), "wait after the first failure; doubles, with jitter"
    )
    retry_max_seconds: float = _setting(1800.0, _between(1, 86400), "longest wait between tries")
    batch_size: int = _setting(50, _between(1, 10000), "items sent per association")
    tls_ca_file: Path | None = _setting(
        None, None, "CA certificates (PEM) that sign +tls destinations; default: the system's"
    )
    tls_cert_file: Path | None = _setting(
        None, None, "the node's client certificate (PEM) for +tls destinations that ask for one"
    )
    tls_key_file: Path | None = _setting(None, None, "private key (PEM) of tls_cert_file")
    web_token_file: Path | None = _setting(
        None, None, "file holding the bearer token for DICOMweb destinations"
    )
    web_user: str = _setting("", None, "HTTP Basic user for DICOMweb destinations")
    web_password_file: Path | None = _setting(None, None, "file holding web_user's password")

    @property
    def parsed_destinations(self) -> list[Destination | WebDestination]:
        return [parse_destination(d) for d in self.destinations]

    @property
    def tls(self) -> TlsFiles:
        """The TLS files for +tls destinations (and the report PACS)."""
        return TlsFiles(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


@dataclass(frozen=True)
class ReconcileConfig:
    """``[reconcile]``: learning from the PACS (C-FIND) which flagged studies were reported."""

    pacs: str = _setting(
        "",
        _one_destination,
        "PACS asked for reports: AE_TITLE@host:port[+tls] (C-FIND) or an http(s):// DICOMweb "
        "base URL (QIDO-RS); empty = none",
    )
    interval_seconds: float = _setting(
        60.0, _between(0.2, 86400), "how often unreported positives are looked up"
    )
    recheck_seconds: float = _setting(
        300.0, _between(0, 604800), "a study is looked up again at most this often"
    )
    batch_size: int = _setting(20, _between(1, 10000), "studies looked up per round")
    timeout_seconds: float = _setting(30.0, _between(1, 3600), "C-FIND association timeout")
    report_modalities: list[str] = _list_setting(
        None, "series modalities that count as a report (besides SR and PDF rules), e.g. ['KO']"
    )
    report_series_descriptions: list[str] = _list_setting(
        None, "series description patterns (shell style, any case) that count as a report"
    )


@dataclass(frozen=True)
class HL7Config:
    """``[hl7]``: the ORU^R01 listener (MLLP) telling the node which studies are reported."""

    port: int = _setting(0, _between(0, 65535), "MLLP port for ORU^R01 messages; 0 = off")
    bind: str = _setting("0.0.0.0", None, "address the MLLP listener listens on")  # noqa: S104
    allowed_networks: list[str] = _list_setting(
        _networks, "addresses/networks allowed to connect; empty = any"
    )
    accession_fields: list[str] = _list_setting(
        _hl7_fields,
        "fields holding the accession number (OBR-n or ORC-n); the first non-empty wins",
        default=("OBR-18", "OBR-3"),
    )


@dataclass(frozen=True)
class EscalationConfig:
    """``[escalation]``: what happens to positives nobody reports."""

    after_seconds: float = _setting(
        3600.0, _between(0, 31536000), "escalate unreported positives flagged this long; 0 = off"
    )
    repeat_seconds: float = _setting(
        3600.0, _between(1, 31536000), "escalate again after this long while still unreported"
    )
    interval_seconds: float = _setting(
        30.0, _between(0.2, 86400), "how often escalations are looked for"
    )
    ris: str = _setting(
        "", _host_port, "host:port of a RIS taking ORM^O01 priority updates (MLLP); empty = none"
    )
    ris_application: str = _setting("RIS", None, "MSH-5 receiving application of those messages")
    timeout_seconds: float = _setting(10.0, _between(1, 600), "wait for the RIS's ACK")


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: how long received data and study rows are kept."""

    spool_days: float = _setting(
        7.0,
        _between(0, 36500),
        "days spooled instances and result files are kept after the results were delivered",
    )
    priority_days: float = _setting(
        90.0,
        _between(0, 36500),
        "days a study's row (priority, report status) is kept once its files are purged",
    )
    interval_seconds: float = _setting(
        3600.0, _between(1, 86400), "how often retention looks for data past its time"
    )
    batch_size: int = _setting(500, _between(1, 100000), "studies purged or deleted per round")


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: structured logs on standard error."""

    level: str = _setting("INFO", _log_level, "DEBUG, INFO, WARNING or ERROR")
    format: str = _setting("text", _log_format, "'text' (key=value) or 'json' (one object a line)")


@dataclass(frozen=True)
class Config:
    """The whole configuration. Built only by :func:`load_config`, so it is always valid."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    dicomweb: DicomwebConfig = field(default_factory=DicomwebConfig)
    web: WebConfig = field(default_factory=WebConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    hl7: HL7Config = field(default_factory=HL7Config)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "defaults"

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.storage.data_dir / 'triage-node.sqlite3'}"


SECTIONS: dict[str, type] = {
    "dicom": DicomConfig,
    "dicomweb": DicomwebConfig,
    "web": WebConfig,
    "storage": StorageConfig,
    "database": DatabaseConfig,
    "study": StudyConfig,
    "service": ServiceConfig,
    "worker": WorkerConfig,
    "delivery": DeliveryConfig,
    "reconcile": ReconcileConfig,
    "hl7": HL7Config,
    "escalation": EscalationConfig,
    "retention": RetentionConfig,
    "log": LogConfig,
}
