"""The web interface's users, sessions and audit trail.

Passwords arrive here already hashed (``web.passwords``); a session is found by the SHA-256 of
its cookie token, never by the token itself. Audit events name users, actions and targets (a
study UID, an outbox item): never a patient's name, ID or accession number.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from triage_node.db.engine import Aggregate
from triage_node.db.schema import audit_events, fit, web_sessions, web_users


class Role(enum.StrEnum):
    """What a web user may do: readers use the worklist and study pages, admins also the
    dashboard and its actions."""

    READER = "reader"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class WebUser:
    id: int
    username: str
    role: Role
    password_hash: str
    created_at: datetime
    password_changed_at: datetime


@dataclass(frozen=True, slots=True)
class WebSession:
    id: int
    user: WebUser
    csrf_token: str
    created_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime
    username: str
    action: str
    peer: str
    target: str
    detail: str | None


def _user_id(conn: Connection, username: str) -> int | None:
    found = conn.execute(select(web_users.c.id).where(web_users.c.username == username)).first()
    return None if found is None else int(found.id)


class UserExists(ValueError):
    """``users add`` for a name that is taken."""


class WebAccess(Aggregate):
    """Users, their sessions and the audit trail."""

    # -- users -------------------------------------------------------------------------------

    @staticmethod
    def _user(row: Any) -> WebUser:
        return WebUser(
            id=row.id,
            username=row.username,
            role=Role(row.role),
            password_hash=row.password_hash,
            created_at=row.created_at,
            password_changed_at=row.password_changed_at,
        )

    def add_user(self, username: str, password_hash: str, role: Role, now: datetime) -> None:
        with self._begin() as conn:
            if _user_id(conn, username) is not None:
                raise UserExists(f"user {username!r} exists; use 'triage-node users passwd'")
            conn.execute(
                insert(web_users).values(
                    username=username,
                    password_hash=password_hash,
                    role=role.value,
                    created_at=now,
                    password_changed_at=now,
                )
            )

    def user(self, username: str) -> WebUser | None:
        with self._connect() as conn:
            row = conn.execute(select(web_users).where(web_users.c.username == username)).first()
        return None if row is None else self._user(row)

    def users(self) -> list[WebUser]:
        with self._connect() as conn:
            rows = conn.execute(select(web_users).order_by(web_users.c.username)).all()
        return [self._user(r) for r in rows]

    def set_password(self, username: str, password_hash: str, now: datetime) -> bool:
        """New password; every open session of the user ends. False when there is no such
        user."""
        with self._begin() as conn:
            user_id = _user_id(conn, username)
            if user_id is None:
                return False
            conn.execute(
                update(web_users)
                .where(web_users.c.id == user_id)
                .values(password_hash=password_hash, password_changed_at=now)
            )
            conn.execute(delete(web_sessions).where(web_sessions.c.user_id == user_id))
        return True

    def rehash(self, user_id: int, password_hash: str) -> None:
        """Store a stronger hash of the same password (the hasher's parameters went up)."""
        with self._begin() as conn:
            conn.execute(
                update(web_users)
                .where(web_users.c.id == user_id)
                .values(password_hash=password_hash)
            )

    def remove_user(self, username: str) -> bool:
        with self._begin() as conn:
            user_id = _user_id(conn, username)
            if user_id is None:
                return False
            conn.execute(delete(web_sessions).where(web_sessions.c.user_id == user_id))
            conn.execute(delete(web_users).where(web_users.c.id == user_id))
        return True

    # -- sessions ----------------------------------------------------------------------------

    def open_session(self, user_id: int, token_hash: str, csrf_token: str, now: datetime) -> None:
        with self._begin() as conn:
            conn.execute(
                insert(web_sessions).values(
                    token_hash=token_hash,
                    user_id=user_id,
                    csrf_token=csrf_token,
                    created_at=now,
                    last_seen_at=now,
                )
            )

    def session(self, token_hash: str) -> WebSession | None:
        query = (
            select(
                web_sessions.c.id.label("session_id"),
                web_sessions.c.csrf_token,
                web_sessions.c.created_at.label("session_created_at"),
                web_sessions.c.last_seen_at,
                web_users,
            )
            .join(web_users, web_users.c.id == web_sessions.c.user_id)
            .where(web_sessions.c.token_hash == token_hash)
        )
        with self._connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return WebSession(
            id=row.session_id,
            user=self._user(row),
            csrf_token=row.csrf_token,
            created_at=row.session_created_at,
            last_seen_at=row.last_seen_at,
        )

    def touch_session(self, session_id: int, now: datetime) -> None:
        with self._begin() as conn:
            conn.execute(
                update(web_sessions).where(web_sessions.c.id == session_id).values(last_seen_at=now)
            )

    def end_session(self, session_id: int) -> None:
        with self._begin() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.id == session_id))

    def end_stale_sessions(self, idle_since: datetime, created_before: datetime) -> int:
        """End sessions idle since *idle_since* or opened before *created_before*."""
        with self._begin() as conn:
            result = conn.execute(
                delete(web_sessions).where(
                    (web_sessions.c.last_seen_at < idle_since)
                    | (web_sessions.c.created_at < created_before)
                )
            )
        return int(result.rowcount or 0)

    # -- audit -------------------------------------------------------------------------------

    def audit(
        self,
        now: datetime,
        username: str,
        action: str,
        *,
        peer: str = "",
        target: str = "",
        detail: str | None = None,
    ) -> None:
        with self._begin() as conn:
            conn.execute(
                insert(audit_events).values(
                    at=now,
                    username=fit(audit_events, "username", username),
                    action=fit(audit_events, "action", action),
                    peer=fit(audit_events, "peer", peer),
                    target=fit(audit_events, "target", target),
                    detail=None if detail is None else fit(audit_events, "detail", detail),
                )
            )

    def audit_events(self, limit: int = 100) -> list[AuditEvent]:
        with self._connect() as conn:
            rows = conn.execute(
                select(audit_events)
                .order_by(audit_events.c.at.desc(), audit_events.c.id.desc())
                .limit(limit)
            ).all()
        return [AuditEvent(r.at, r.username, r.action, r.peer, r.target, r.detail) for r in rows]
