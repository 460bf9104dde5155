"""The web interface's pages and actions (Starlette).

Every page needs a signed-in user; the dashboard and its actions need the ``admin`` role.
Every state-changing request is a POST carrying the session's CSRF token (and, when the browser
sends one, an Origin of this site). Templates auto-escape, and the Content-Security-Policy
allows scripts, styles and images from this site only, with no inline script or style: a
DICOM or HL7 string can at worst be shown as text. Patient identifiers appear on the study page
only, read from the spooled file at request time; they are never logged or stored elsewhere.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from pydicom import dcmread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triage_node import __version__
from triage_node.config import Config
from triage_node.db.database import Database
from triage_node.db.outbox import OutboxItem, OutboxState
from triage_node.db.priority import ReportSource
from triage_node.db.study_view import HourOfActivity, WorklistEntry
from triage_node.db.web_access import Role, WebSession
from triage_node.domain import OPERATING_POINT_ORDER, OperatingPointName, ResultKind, utcnow
from triage_node.logs import get_logger, log_event
from triage_node.networks import AllowedNetworks
from triage_node.ops.status import collect_status
from triage_node.spool import Spool
from triage_node.web.images import ThumbnailCache, captured_source, render_capture, render_source
from triage_node.web.sessions import COOKIE, Sessions, SignIn

LOG = get_logger(__name__)

SIGNIN_COOKIE = "triage_signin"  # the sign-in form's CSRF token (double submit)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on form posts
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
AGE_FILTERS: dict[str, tuple[str, timedelta | None, timedelta | None]] = {
    "": ("any age", None, None),
    "lt1h": ("flagged < 1 h ago", None, timedelta(hours=1)),
    "lt24h": ("flagged < 24 h ago", None, timedelta(hours=24)),
    "gt1h": ("waiting > 1 h", timedelta(hours=1), None),
    "gt24h": ("waiting > 24 h", timedelta(hours=24), None),
}
POINT_LABELS = {
    "": "any operating point",
    OperatingPointName.HIGH_SENSITIVITY.value: "high sensitivity or stricter",
    OperatingPointName.HIGH_SPECIFICITY.value: "high specificity",
}
MAX_FORM_BYTES = 16 * 1024  # every form the pages post is a few hundred bytes
CAPTURE_MEMORY = 20_000  # heatmap file -> source image, remembered for this many files
IDENTIFIERS = ("PatientName", "PatientID", "AccessionNumber", "StudyDescription", "StudyDate")


class SecurityHeaders:
    """Adds the security headers to every response, and refuses addresses not allowed; the
    ``Server-Timing`` header says how long the node took to make the response (what
    ``benchmarks/web.py`` reads)."""

    def __init__(self, app: ASGIApp, allowed: AllowedNetworks, hsts: bool) -> None:
        self.app = app
        self.allowed = allowed
        self.headers = list(SECURITY_HEADERS)
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        refusal: Response | None = None
        if not self.allowed.allows(client[0] if client else ""):
            refusal = Response("Forbidden: address not allowed", 403, media_type="text/plain")
        elif scope["method"] not in ("GET", "HEAD") and not _small_body(scope):
            # Forms are parsed in memory: a body must say its length, and a small one.
            refusal = Response("Request body too large", 413, media_type="text/plain")
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        started = time.perf_counter()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"].extend(self.headers)
                took = (time.perf_counter() - started) * 1000
                message["headers"].append((b"server-timing", f"app;dur={took:.1f}".encode()))
            await send(message)

        await self.app(scope, receive, with_headers)


def _small_body(scope: Scope) -> bool:
    """Whether the request declares a body of at most MAX_FORM_BYTES (chunked bodies, with no
    length, are refused)."""
    headers = dict(scope.get("headers") or [])
    if b"transfer-encoding" in headers:
        return False
    length = headers.get(b"content-length", b"0")
    return length.isdigit() and int(length) <= MAX_FORM_BYTES


@dataclass(frozen=True)
class _Page:
    """What every page template gets."""

    user: str
    role: str
    csrf: str
    version: str


def _peer(request: Request) -> str:
    return request.client.host if request.client else ""


def _age(at: datetime | None, now: datetime) -> str:
    if at is None:
        return ""
    seconds = max(0, int((now - at).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _when(at: datetime | None) -> str:
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _study_date(value: str) -> str:
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:8]}"
    return value


def _text(value: Any) -> str:
    """A header value as plain text (the template escapes it)."""
    if value is None:
        return ""
    return str(value).replace("^", " ").strip()[:200]


class WebApp:
    """The pages and actions over one database."""

    def __init__(
        self,
        config: Config,
        store: Database,
        *,
        clock: Callable[[], datetime] = utcnow,
        status: Callable[[Config], dict[str, Any]] = collect_status,
    ) -> None:
        self.config = config
        self.web = config.web
        self.store = store
        self.spool = Spool(config.storage.spool_path)
        self.sessions = Sessions(store.web_access, config.web, clock)
        self.clock = clock
        self.status = status
        self.thumbnails = ThumbnailCache(config.web.image_cache_mb * 2**20)
        self._capture_sources: dict[str, str | None] = {}
        self.templates = Environment(
            loader=PackageLoader("triage_node.web", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(age=_age, when=_when, study_date=_study_date)
        self.tls = config.web.tls_cert_file is not None

    # -- the ASGI application --------------------------------------------------------------

    def asgi(self) -> ASGIApp:
        static = StaticFiles(packages=[("triage_node.web", "static")])
        app = Starlette(
            routes=[
                Route("/", self.home),
                Route("/signin", self.signin_form, methods=["GET"]),
                Route("/signin", self.signin, methods=["POST"]),
                Route("/signout", self.signout, methods=["POST"]),
                Route("/worklist", self.worklist),
                Route("/api/worklist", self.worklist_json),
                Route("/studies/{study_uid}", self.study),
                Route("/studies/{study_uid}/reported", self.mark_reported, methods=["POST"]),
                Route("/studies/{study_uid}/images/{sop_uid}/{kind}.png", self.thumbnail),
                Route("/dashboard", self.dashboard),
                Route("/dashboard/outbox/retry", self.retry, methods=["POST"]),
                Mount("/static", static, name="static"),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )
        return SecurityHeaders(app, AllowedNetworks(self.web.allowed_networks), self.tls)

    # -- helpers -----------------------------------------------------------------------------

    def _render(self, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(**values)
        return HTMLResponse(html, status, headers={"Cache-Control": "no-store"})

    def _page(self, session: WebSession) -> _Page:
        user = session.user
        return _Page(user.username, user.role.value, session.csrf_token, __version__)

    def _session(self, request: Request) -> WebSession | None:
        return self.sessions.find(request.cookies.get(COOKIE))

    def _to_signin(self, request: Request) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "sign in first"}, 401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/signin?" + urlencode({"next": target}), 303)

    def _forbidden(self, session: WebSession, what: str) -> HTMLResponse:
        return self._render(
            "error.html", 403, page=self._page(session), title="Not allowed", message=what
        )

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # not sent by every client; the CSRF token is the check then
            return True
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return origin == expected

    async def _checked_post(
        self, request: Request, role: Role | None = None
    ) -> tuple[WebSession, dict[str, str]] | Response:
        """The session and form of a POST that passed the session, role, origin and CSRF
        checks; otherwise the response refusing it."""
        session = await run_in_threadpool(self._session, request)
        if session is None:
            return self._to_signin(request)
        form = await request.form(max_files=0, max_fields=20)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        token = fields.get("csrf_token", "")
        if not self._same_origin(request) or not secrets.compare_digest(
            token.encode(), session.csrf_token.encode()
        ):
            log_event(LOG, logging.WARNING, "web_csrf_refused", "POST refused", peer=_peer(request))
            return self._render(
                "error.html",
                403,
                page=self._page(session),
                title="Refused",
                message="This form has expired or did not come from this site. Reload the page "
                "and try again.",
            )
        if role is Role.ADMIN and session.user.role is not Role.ADMIN:
            return self._forbidden(session, "This action is for administrators.")
        return session, fields

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return Response("Not found", 404, media_type="text/plain")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return Response("Method not allowed", 405, media_type="text/plain")

    # -- sign-in -----------------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        return RedirectResponse("/worklist", 303)

    @staticmethod
    def _next(value: str | None) -> str:
        """Where to go after sign-in: a path on this site only."""
        if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
            return "/worklist"
        return value

    def signin_form(
        self, request: Request, message: str = "", status: int = 200, target: str | None = None
    ) -> Response:
        """The sign-in form; *target* (a refused POST's ``next``) or the query's ``next`` is
        where a successful sign-in goes."""
        token = secrets.token_urlsafe(32)
        response = self._render(
            "signin.html",
            status,
            csrf=token,
            next=self._next(target or request.query_params.get("next")),
            message=message,
            version=__version__,
        )
        response.set_cookie(
            SIGNIN_COOKIE,
            token,
            max_age=3600,
            httponly=True,
            secure=self.web.secure_cookies,
            samesite="strict",
        )
        return response

    async def signin(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=10)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        expected = request.cookies.get(SIGNIN_COOKIE, "")
        if (
            not expected
            or not self._same_origin(request)
            or not secrets.compare_digest(fields.get("csrf_token", "").encode(), expected.encode())
        ):
            return self.signin_form(
                request, "The sign-in form expired; please try again.", 403, fields.get("next")
            )
        outcome: SignIn = await run_in_threadpool(
            self.sessions.sign_in,
            fields.get("username", ""),
            fields.get("password", ""),
            _peer(request),
        )
        if outcome.token is None:
            return self.signin_form(
                request, outcome.refusal, 429 if outcome.locked else 401, fields.get("next")
            )
        response = RedirectResponse(self._next(fields.get("next")), 303)
        response.set_cookie(
            COOKIE,
            outcome.token,
            max_age=self.web.session_max_hours * 3600,
            httponly=True,
            secure=self.web.secure_cookies,
            samesite="strict",
        )
        response.delete_cookie(SIGNIN_COOKIE)
        return response

    async def signout(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        await run_in_threadpool(self.sessions.sign_out, session, _peer(request))
        response = RedirectResponse("/signin", 303)
        response.delete_cookie(COOKIE)
        return response

    # -- the worklist ------------------------------------------------------------------------

    def _filtered(self, request: Request) -> tuple[list[WorklistEntry], str, str]:
        point = request.query_params.get("point", "")
        age = request.query_params.get("age", "")
        point = point if point in POINT_LABELS else ""
        age = age if age in AGE_FILTERS else ""
        entries = self.store.study_view.worklist()
        if point:
            least = OPERATING_POINT_ORDER.index(OperatingPointName(point))
            strict = {p.value for p in OPERATING_POINT_ORDER[least:]}
            entries = [e for e in entries if e.operating_point in strict]
        _, older, younger = AGE_FILTERS[age]
        now = self.clock()
        if older is not None:
            entries = [e for e in entries if now - e.flagged_at > older]
        if younger is not None:
            entries = [e for e in entries if now - e.flagged_at <= younger]
        return entries, point, age

    def _row(self, entry: WorklistEntry, now: datetime) -> dict[str, Any]:
        return {
            "rank": entry.rank,
            "study_uid": entry.study_uid,
            "score": None if entry.score is None else round(entry.score, 3),
            "operating_point": entry.operating_point or "",
            "body_part": entry.body_part,
            "study_date": _study_date(entry.study_date),
            "flagged_at": entry.flagged_at.isoformat(),
            "age": _age(entry.flagged_at, now),
            "escalations": entry.escalations,
        }

    def worklist(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_signin(request)
        entries, point, age = self._filtered(request)
        now = self.clock()
        return self._render(
            "worklist.html",
            page=self._page(session),
            rows=[self._row(e, now) for e in entries],
            point=point,
            age=age,
            points=POINT_LABELS,
            ages={k: v[0] for k, v in AGE_FILTERS.items()},
            updated=now.strftime("%H:%M:%S UTC"),
            refresh_ms=int(self.web.refresh_seconds * 1000),
        )

    def worklist_json(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_signin(request)
        entries, _, _ = self._filtered(request)
        now = self.clock()
        return JSONResponse(
            {
                "updated": now.strftime("%H:%M:%S UTC"),
                "rows": [self._row(e, now) for e in entries],
            },
            headers={"Cache-Control": "no-store"},
        )

    # -- a study -----------------------------------------------------------------------------

    def _identifiers(self, study_uid: str) -> dict[str, str]:
        """Patient and study identifiers from a spooled instance's header (never logged)."""
        relpath = self.store.study_view.instance_path(study_uid)
        if relpath is None:
            return {}
        try:
            ds = dcmread(
                self.spool.root / relpath, stop_before_pixels=True, specific_tags=list(IDENTIFIERS)
            )
            return {keyword: _text(ds.get(keyword)) for keyword in IDENTIFIERS}
        except Exception:  # a file retention removed meanwhile, or one pydicom cannot read
            return {}

    def _heatmaps(self, items: list[OutboxItem]) -> dict[str, Path]:
        """Source SOP Instance UID -> the newest heatmap capture of it in the spool, among a
        study's result objects (*items*, newest first)."""
        found: dict[str, Path] = {}
        for item in items:
            if item.kind is not ResultKind.SC:
                continue
            key = str(item.path)
            if key not in self._capture_sources:
                if len(self._capture_sources) >= CAPTURE_MEMORY:
                    self._capture_sources.clear()
                self._capture_sources[key] = captured_source(item.path)
            source = self._capture_sources[key]
            if source is not None and source not in found and item.path.exists():
                found[source] = item.path
        return found

    def study(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_signin(request)
        study_uid = request.path_params["study_uid"]
        facts = self.store.study_view.facts(study_uid)
        row = self.store.priority.row(study_uid)
        if facts is None or row is None:
            return self._render(
                "error.html",
                404,
                page=self._page(session),
                title="No such study",
                message="The node holds no study with this UID (retention may have removed it).",
            )
        now = self.clock()
        deliveries = self.store.outbox.items(study_uid=study_uid, limit=1000)
        heatmaps = self._heatmaps(deliveries)
        timeline = [
            ("received", facts.first_received_at, ""),
            ("last instance", facts.last_received_at, ""),
            ("queued", facts.queued_at, ""),
            ("analysed", facts.inferred_at, row.outcome.value if row.outcome else ""),
            ("flagged", row.flagged_at, row.operating_point or ""),
        ]
        sent = [d.sent_at for d in deliveries if d.sent_at is not None]
        if sent:
            timeline.append(("delivered", max(sent), f"{len(sent)} of {len(deliveries)} objects"))
        if row.escalated_at is not None:
            timeline.append(("escalated", row.escalated_at, f"{row.escalations} time(s)"))
        if row.reported_at is not None:
            by = f" by {facts.reported_by}" if facts.reported_by else ""
            source = row.report_source.value if row.report_source else ""
            timeline.append(("reported", row.reported_at, f"{source}{by}"))
        return self._render(
            "study.html",
            page=self._page(session),
            study=row,
            facts=facts,
            identifiers=self._identifiers(study_uid),
            images=facts.images,
            heatmaps=set(heatmaps),
            timeline=[(what, at, note) for what, at, note in timeline if at is not None],
            deliveries=deliveries,
            now=now,
        )

    def thumbnail(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return Response(status_code=401)
        study_uid = request.path_params["study_uid"]
        sop_uid = request.path_params["sop_uid"]
        kind = request.path_params["kind"]
        if kind not in ("source", "heatmap"):
            return Response("Not found", 404, media_type="text/plain")
        key = f"{kind}:{study_uid}:{sop_uid}"
        png = self.thumbnails.get(key)
        if png is None:
            if kind == "source":
                relpath = self.store.study_view.instance_path(study_uid, sop_uid)
                png = None if relpath is None else render_source(self.spool.root / relpath)
            else:
                results = self.store.outbox.items(study_uid=study_uid, limit=1000)
                capture = self._heatmaps(results).get(sop_uid)
                png = None if capture is None else render_capture(capture)
            if png is None:
                return Response("No image", 404, media_type="text/plain")
            self.thumbnails.put(key, png)
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    async def mark_reported(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        study_uid = request.path_params["study_uid"]
        now = self.clock()

        def record() -> list[tuple[str, bool]]:
            found = self.store.priority.mark_reported(
                ReportSource.WEB, now, study_uid=study_uid, reported_by=session.user.username
            )
            if found:
                self.store.web_access.audit(
                    now,
                    session.user.username,
                    "mark_reported",
                    peer=_peer(request),
                    target=study_uid,
                    detail=None if found[0][1] else "already reported",
                )
            return found

        found = await run_in_threadpool(record)
        if not found:
            return Response("Not found", 404, media_type="text/plain")
        log_event(
            LOG,
            logging.INFO,
            "web_mark_reported",
            "study marked reported",
            user=session.user.username,
            study_uid=study_uid,
            newly=found[0][1],
        )
        return RedirectResponse(f"/studies/{study_uid}", 303)

    # -- the dashboard -----------------------------------------------------------------------

    def dashboard(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_signin(request)
        if session.user.role is not Role.ADMIN:
            return self._forbidden(session, "The dashboard is for administrators.")
        report = self.status(self.config)
        now = self.clock()
        activity = self.store.study_view.activity(now)
        return self._render(
            "dashboard.html",
            page=self._page(session),
            report=report,
            dead=self.store.outbox.items(OutboxState.DEAD, limit=50),
            failures=self.store.queue.recent_failures(20),
            audit=self.store.web_access.audit_events(20),
            chart=_chart(activity),
            activity=activity,
            now=now,
        )

    async def retry(self, request: Request) -> Response:
        checked = await self._checked_post(request, Role.ADMIN)
        if isinstance(checked, Response):
            return checked
        session, fields = checked
        item = fields.get("item", "")
        ids = [int(item)] if item.isdigit() else None  # none: every dead item
        now = self.clock()

        def revive() -> int:
            revived = self.store.outbox.retry(now, ids)
            self.store.web_access.audit(
                now,
                session.user.username,
                "outbox_retry",
                peer=_peer(request),
                target="all dead" if ids is None else f"outbox item {ids[0]}",
                detail=f"{revived} item(s) queued again",
            )
            return revived

        revived = await run_in_threadpool(revive)
        log_event(
            LOG,
            logging.INFO,
            "web_outbox_retry",
            "outbox retry",
            user=session.user.username,
            revived=revived,
        )
        return RedirectResponse("/dashboard", 303)


@dataclass(frozen=True)
class Chart:
    """The dashboard's 24-hour chart as SVG coordinates (drawn by the template: no script)."""

    width: int
    height: int
    series: list[tuple[str, str, str]]  # (name, css class, polyline points)
    wait_points: str
    top: int
    top_wait: float
    labels: list[tuple[float, str]]  # (x, hour)


def _chart(hours: list[HourOfActivity], width: int = 720, height: int = 160) -> Chart:
    top = max([1, *(max(h.received, h.analysed, h.flagged) for h in hours)])
    waits = [h.mean_seconds_to_result for h in hours]
    top_wait = max([1.0, *(w for w in waits if w is not None)])
    step = width / max(1, len(hours) - 1)

    def points(values: list[float | None], scale: float) -> str:
        return " ".join(
            f"{i * step:.1f},{height - (v / scale) * (height - 10):.1f}"
            for i, v in enumerate(values)
            if v is not None
        )

    series = [
        ("received", "received", points([h.received for h in hours], top)),
        ("analysed", "analysed", points([h.analysed for h in hours], top)),
        ("flagged", "flagged", points([h.flagged for h in hours], top)),
    ]
    labels = [(i * step, h.start.strftime("%H:00")) for i, h in enumerate(hours) if i % 4 == 0]
    return Chart(width, height, series, points(waits, top_wait), top, top_wait, labels)
