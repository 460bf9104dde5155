"""The checks of configuration values: each returns a complaint, or None when the value is
fine; and the field helpers that attach a check and a description to a setting."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import field
from typing import Any

from triage_node.credentials import hash_problem
from triage_node.domain import field_name, parse_destination

Check = Callable[[Any], str | None]  # returns a complaint, or None when the value is fine


def _between(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _ae_title(value: Any) -> str | None:
    # PS3.5 Table 6.2-1 (AE): 1-16 characters of the default repertoire, no backslash or
    # control characters, not all spaces.
    if not 0 < len(value.strip()) <= 16:
        return "must be 1 to 16 characters"
    if any(c == "\\" or not 32 <= ord(c) < 127 for c in value):
        return "may only hold printable ASCII characters other than backslash"
    return None


def _ae_titles(value: Any) -> str | None:
    for title in value:
        problem = _ae_title(title)
        if problem:
            return f"entry {title!r} {problem}"
    return None


def _networks(value: Any) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"entry {item!r} is not an IP address or network (like 10.0.0.0/8)"
    return None


def _hashes(value: Any) -> str | None:
    for number, item in enumerate(value, 1):
        problem = hash_problem(item)
        if problem:
            return f"entry {number} {problem}"
    return None


def _users(value: Any) -> str | None:
    for item in value:
        name, colon, hashed = item.partition(":")
        if not colon or not name or any(c in name for c in ": \t"):
            return f"entry {item[:20]!r}... must be NAME:HASH"
        problem = hash_problem(hashed)
        if problem:
            return f"entry for {name!r}: the hash {problem}"
    return None


def _base_path(value: Any) -> str | None:
    if value and (not value.startswith("/") or value.endswith("/")):
        return "must start with / and not end with / (like /dicom-web), or be empty"
    return None


def _log_level(value: Any) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if value.upper() in levels else f"must be one of {', '.join(levels)}"


def _log_format(value: Any) -> str | None:
    return None if value in ("text", "json") else "must be 'text' or 'json'"


def _transport(value: Any) -> str | None:
    return (
        None
        if value in ("auto", "pynetdicom", "dcmtk")
        else "must be 'auto', 'pynetdicom' or 'dcmtk'"
    )


def _unlabelled(value: Any) -> str | None:
    return None if value in ("analyse", "skip") else "must be 'analyse' or 'skip'"


def _db_url(value: Any) -> str | None:
    if value and not value.startswith(("sqlite", "postgresql")):
        return "must be empty (embedded SQLite), a sqlite:/// URL or a postgresql+psycopg:// URL"
    return None


def _destinations(value: Any) -> str | None:
    for item in value:
        try:
            parse_destination(item)
        except ValueError as exc:
            return f"entry {exc}"
    return None


def _one_destination(value: Any) -> str | None:
    return _destinations([value]) if value else None


def _host_port(value: Any) -> str | None:
    host, _, port = str(value).rpartition(":")
    if value and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        return "must be empty or host:port"
    return None


def _hl7_fields(value: Any) -> str | None:
    if not value:
        return "must name at least one field"
    for item in value:
        try:
            segment, _ = field_name(item)
        except ValueError as exc:
            return str(exc)
        if segment not in ("OBR", "ORC"):
            return f"entry {item!r}: the accession number is read from OBR or ORC fields"
    return None


def _setting(default: Any, check: Check | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


def _list_setting(check: Check | None = None, doc: str = "", default: tuple[str, ...] = ()) -> Any:
    return field(default_factory=lambda: list(default), metadata={"check": check, "doc": doc})
