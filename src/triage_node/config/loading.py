"""Building a :class:`Config`: defaults, then the TOML file, then ``TRIAGE_NODE_*`` variables,
each value coerced to its setting's type and checked."""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from triage_node.config.sections import (
    SECTIONS,
    Config,
    DicomConfig,
    DicomwebConfig,
    WebConfig,
)
from triage_node.errors import ConfigError

ENV_PREFIX = "TRIAGE_NODE_"
ENV_CONFIG_FILE = "TRIAGE_NODE_CONFIG"


def _coerce(raw: Any, annotation: Any, *, from_env: bool) -> Any:
    """Turn a TOML or environment value into the type the setting declares."""
    origin = typing.get_origin(annotation)
    if origin is types.UnionType:  # ``X | None``
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
        if raw is None or (from_env and raw == ""):
            return None
        return _coerce(raw, inner, from_env=from_env)
    if origin is list:
        if from_env:
            raw = [part.strip() for part in str(raw).split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ValueError("must be a list of strings")
        return list(raw)
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false")
    if annotation is int:
        if isinstance(raw, bool):
            raise ValueError("must be a whole number")
        if isinstance(raw, int):
            return raw
        if from_env:
            return int(raw)
        raise ValueError("must be a whole number")
    if annotation is float:
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        if isinstance(raw, int | float):
            return float(raw)
        if from_env:
            return float(raw)
        raise ValueError("must be a number")
    if annotation is Path:
        if not isinstance(raw, str) or not raw:
            raise ValueError("must be a non-empty path")
        return Path(raw).expanduser()
    if annotation is str:
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        return raw
    raise TypeError(f"unsupported setting type {annotation!r}")


def _build_section(section: str, cls: type, values: Mapping[str, tuple[Any, str, bool]]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, (raw, origin, from_env) in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key} ({origin}): unknown setting")
        try:
            value = _coerce(raw, hints[key], from_env=from_env)
        except ValueError as exc:
            detail = str(exc) if "must" in str(exc) else f"cannot read {raw!r}"
            raise ConfigError(f"{section}.{key} ({origin}): {detail}") from None
        check = known[key].metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"{section}.{key} ({origin}): {problem}, got {raw!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration; raise :class:`ConfigError` naming the first bad key."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_CONFIG_FILE):
        path = Path(env[ENV_CONFIG_FILE])
    collected: dict[str, dict[str, tuple[Any, str, bool]]] = {name: {} for name in SECTIONS}

    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"configuration file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        for section, table in document.items():
            if section not in SECTIONS:
                raise ConfigError(f"[{section}] ({path}): unknown section")
            if not isinstance(table, dict):
                raise ConfigError(f"{section} ({path}): must be a [table]")
            for key, value in table.items():
                collected[section][key] = (value, str(path), False)

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"{name}: not a triage-node setting (TRIAGE_NODE_<SECTION>_<KEY>)")
        collected[section][key] = (value, name, True)

    built = {name: _build_section(name, cls, collected[name]) for name, cls in SECTIONS.items()}
    _check_tls(built["dicom"])
    _check_dicomweb(built["dicomweb"], built["dicom"])
    _check_web(built["web"], built["dicomweb"], built["dicom"])
    source = str(path) if path is not None else "defaults"
    return Config(**built, source=source)


def _check_tls(dicom: DicomConfig) -> None:
    """Settings of the TLS listener that only make sense together."""
    if dicom.tls_port and (dicom.tls_cert_file is None or dicom.tls_key_file is None):
        raise ConfigError("dicom.tls_port: needs dicom.tls_cert_file and dicom.tls_key_file")
    if dicom.tls_port and dicom.tls_port == dicom.port:
        raise ConfigError(f"dicom.tls_port: must differ from dicom.port, got {dicom.tls_port}")
    if dicom.tls_verify_client and dicom.tls_ca_file is None:
        raise ConfigError("dicom.tls_verify_client: needs dicom.tls_ca_file to verify against")


def _check_dicomweb(web: DicomwebConfig, dicom: DicomConfig) -> None:
    """A STOW-RS receiver that no one could use, or anyone could, is a mistake: say so."""
    if not web.port:
        return
    if not (web.tokens or web.users or web.allow_anonymous or web.tls_verify_client):
        raise ConfigError(
            "dicomweb.port: nobody may store; set dicomweb.tokens or dicomweb.users "
            "('triage-node hash-secret'), dicomweb.tls_verify_client, or allow_anonymous"
        )
    if web.port in (dicom.port, dicom.tls_port):
        raise ConfigError(f"dicomweb.port: must differ from the DICOM ports, got {web.port}")
    if (web.tls_cert_file is None) != (web.tls_key_file is None):
        raise ConfigError("dicomweb.tls_cert_file and dicomweb.tls_key_file go together")
    if web.tls_verify_client and (web.tls_ca_file is None or web.tls_cert_file is None):
        raise ConfigError(
            "dicomweb.tls_verify_client: needs dicomweb.tls_cert_file, tls_key_file and tls_ca_file"
        )


def _check_web(web: WebConfig, dicomweb: DicomwebConfig, dicom: DicomConfig) -> None:
    """The web interface's port is its own, and its TLS files come as a pair."""
    if not web.port:
        return
    if web.port in (dicom.port, dicom.tls_port, dicomweb.port):
        raise ConfigError(f"web.port: must differ from the DICOM and STOW-RS ports, got {web.port}")
    if (web.tls_cert_file is None) != (web.tls_key_file is None):
        raise ConfigError("web.tls_cert_file and web.tls_key_file go together")


def describe_settings() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, description) for every setting, for docs and ``--help``."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            rows.append((section, f.name, default, f.metadata.get("doc", "")))
    return rows
