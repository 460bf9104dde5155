"""Configuration: built-in defaults, then one TOML file, then ``TRIAGE_NODE_*`` variables.

Every key lives in a section (``[dicom] port = 11112``) and can be overridden by the variable
``TRIAGE_NODE_<SECTION>_<KEY>`` (``TRIAGE_NODE_DICOM_PORT=104``). The file is named by
``--config PATH`` or ``TRIAGE_NODE_CONFIG``; with neither, the defaults are used as they are. A
bad value stops the program at start with a message naming the key, where it came from and what
is wrong. ``docs/configuration.md`` lists every key.

Part of the foundation every stage may import: ``sections`` (what there is to set), ``checks``
(what a value must be), ``loading`` (where values come from). It imports only ``domain`` and
``errors``.
"""

from triage_node.config.loading import ENV_CONFIG_FILE, ENV_PREFIX, describe_settings, load_config
from triage_node.config.sections import (
    SECTIONS,
    Config,
    DatabaseConfig,
    DeliveryConfig,
    DicomConfig,
    DicomwebConfig,
    EscalationConfig,
    HL7Config,
    LogConfig,
    ReconcileConfig,
    RetentionConfig,
    ServiceConfig,
    StorageConfig,
    StudyConfig,
    WebConfig,
    WorkerConfig,
)

__all__ = [
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "SECTIONS",
    "Config",
    "DatabaseConfig",
    "DeliveryConfig",
    "DicomConfig",
    "DicomwebConfig",
    "EscalationConfig",
    "HL7Config",
    "LogConfig",
    "ReconcileConfig",
    "RetentionConfig",
    "ServiceConfig",
    "StorageConfig",
    "StudyConfig",
    "WebConfig",
    "WorkerConfig",
    "describe_settings",
    "load_config",
]
