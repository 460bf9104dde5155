"""Web users' passwords: Argon2id (argon2-cffi, the reference implementation's binding) with its
library defaults, which follow RFC 9106's recommendations and are raised by new releases; a
hash made with weaker parameters is replaced at the next sign-in."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 10
_HASHER = PasswordHasher()
# Verified against when the user does not exist, so that a wrong name costs as long as a wrong
# password and the answer's timing does not tell which names exist.
_ABSENT = _HASHER.hash("no such user: this hash is never matched")


def hash_password(password: str) -> str:
    """An Argon2id PHC string; ValueError for a password too short to keep."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> tuple[bool, bool]:
    """(matches, needs rehash). *stored* None: the user does not exist (never matches)."""
    try:
        _HASHER.verify(stored or _ABSENT, password)
    except (VerificationError, InvalidHashError):
        return False, False
    if stored is None:
        return False, False
    return True, _HASHER.check_needs_rehash(stored)
