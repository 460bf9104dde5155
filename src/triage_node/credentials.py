"""Who may store over DICOMweb: bearer tokens and HTTP Basic users, checked against salted
PBKDF2 hashes.

The configuration holds only hashes (``triage-node hash-secret`` makes one):
``pbkdf2_sha256$<iterations>$<salt, base64>$<digest, base64>``. A secret that matched once is
remembered (by its SHA-256) for the life of the process, so the deliberate slowness of PBKDF2
is paid once per client, not per request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass

SCHEME = "pbkdf2_sha256"
ITERATIONS = 200_000


def hash_secret(secret: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """A hash of *secret* for ``dicomweb.tokens`` or ``dicomweb.users``."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"{SCHEME}${iterations}${'$'.join(encoded)}"


def hash_problem(value: str) -> str | None:
    """Why *value* is not a hash :func:`hash_secret` made, or None."""
    parts = value.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        return f"is not a {SCHEME} hash (make one with 'triage-node hash-secret')"
    try:
        if int(parts[1]) < 10_000:
            return "has fewer than 10000 iterations"
        base64.b64decode(parts[2], validate=True)
        base64.b64decode(parts[3], validate=True)
    except (ValueError, binascii.Error):
        return "is not a valid hash"
    return None


def matches(secret: str, hashed: str) -> bool:
    _, iterations, salt, digest = hashed.split("$")
    computed = hashlib.pbkdf2_hmac(
        "sha256", secret.encode(), base64.b64decode(salt), int(iterations)
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


@dataclass(frozen=True)
class Principal:
    """Who a request came from, as the log names it (never the secret)."""

    kind: str  # "token", "user" or "anonymous"
    name: str


class Credentials:
    """The ``Authorization`` header of a request, checked against the configured hashes."""

    def __init__(
        self, tokens: list[str], users: list[str], *, allow_anonymous: bool = False
    ) -> None:
        self.tokens = list(tokens)
        self.users = dict(user.split(":", 1) for user in users)
        self.allow_anonymous = allow_anonymous
        self._known: dict[str, Principal] = {}
        self._lock = threading.Lock()

    def check(self, authorization: str | None) -> Principal | None:
        """The principal, or None when the request may not store."""
        if not authorization:
            return Principal("anonymous", "-") if self.allow_anonymous else None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        key = hashlib.sha256(authorization.strip().encode()).hexdigest()
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        principal = None
        if scheme.lower() == "bearer" and value:
            for number, hashed in enumerate(self.tokens, 1):
                if matches(value, hashed):
                    principal = Principal("token", str(number))
                    break
        elif scheme.lower() == "basic" and value:
            try:
                name, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return None
            user_hash = self.users.get(name)
            if user_hash is not None and matches(password, user_hash):
                principal = Principal("user", name)
        if principal is not None:
            with self._lock:
                self._known[key] = principal
        return principal
