"""The web interface in a real headless Chromium, against a running node fed by Orthanc.

One node (HTTPS web port, a model that flags everything, HL7 listener, Orthanc as PACS and
destination) serves every test of this module; each test sends its own studies. Screenshots
of each page are written to ``test-artifacts/web/``.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.support.browser import chromium, screenshot
from tests.support.hl7msgs import oru
from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.orthanc import Orthanc, node_and_orthanc
from tests.support.peers import free_port, storescu, wait_for
from tests.support.pki import make_pki
from tests.support.synth import (
    SYNTHETIC_ACCESSION,
    SYNTHETIC_PATIENT_ID,
    SYNTHETIC_PATIENT_NAME,
    write_study_set,
)
from triage_node.hl7.messages import parse
from triage_node.hl7.mllp import send

pytestmark = pytest.mark.peers

EVERYTHING_POSITIVE = {
    "high_sensitivity": {"threshold": 0.0, "sensitivity": 1.0},
    "high_specificity": {"threshold": 1.0, "specificity": 1.0},
}
READER, ADMIN = ("rita", "reader password 1"), ("adam", "admin password 1")
HOSTILE_NAME = "<script>alert(1)</script>"  # no "=": it separates PN component groups
HOSTILE_DESCRIPTION = '"><img src=x onerror="window.__xss=2">'
HOSTILE_BODY_PART = "<script>"


@dataclass
class Site:
    node: Node
    orthanc: Orthanc
    base: str
    ca: Path
    hl7_port: int
    workdir: Path
    sent: int = 0

    def session(self, user: tuple[str, str]) -> requests.Session:
        """A signed-in requests session (the sign-in form's CSRF cookie and field)."""
        http_session = self.client()
        form = http_session.get(f"{self.base}/signin")
        token = _csrf(form.text)
        answer = http_session.post(
            f"{self.base}/signin",
            data={"csrf_token": token, "username": user[0], "password": user[1], "next": "/"},
            allow_redirects=False,
        )
        assert answer.status_code == 303, answer.text
        return http_session

    def client(self) -> requests.Session:
        """A requests session that trusts the tests' CA (and not REQUESTS_CA_BUNDLE)."""
        http_session = requests.Session()
        http_session.trust_env = False
        http_session.verify = str(self.ca)
        return http_session

    def studies(self, count: int = 1, **tags: str) -> list[tuple[Path, str]]:
        """*count* one-image studies with *tags* set: (file, Study Instance UID)."""
        directory = self.workdir / f"studies-{self.sent}"
        self.sent += 1
        made = []
        for path in write_study_set(directory, count, 96, 80, per_study=1):
            ds = pydicom.dcmread(path)
            for keyword, value in tags.items():
                setattr(ds, keyword, value)
            ds.save_as(path, enforce_file_format=True)
            made.append((path, str(ds.StudyInstanceUID)))
        return made

    def via_orthanc(self, path: Path) -> str:
        study = self.orthanc.upload(path)
        self.orthanc.send_study("node", study)
        return study

    def flagged(self, study_uid: str) -> bool:
        rows = self.node.sql("SELECT flagged_at FROM studies WHERE study_uid = :uid", uid=study_uid)
        return bool(rows) and rows[0]["flagged_at"] is not None

    def delivered(self, study_uid: str) -> bool:
        rows = self.node.sql(
            "SELECT o.state FROM outbox o JOIN studies s ON s.id = o.study_id "
            "WHERE s.study_uid = :uid",
            uid=study_uid,
        )
        return bool(rows) and all(r["state"] == "SENT" for r in rows)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the form"
    return found.group(1)


def _add_user(node: Node, user: tuple[str, str], role: str) -> None:
    result = node.command("users", "add", user[0], "--role", role, input_text=user[1] + "\n")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("web")
    pki = make_pki(workdir / "pki")
    model = write_model_dir(workdir / "model", operating_points=EVERYTHING_POSITIVE)
    web_port, hl7_port = free_port(), free_port()
    node, orthanc = node_and_orthanc(
        workdir,
        model,
        web={
            "port": web_port,
            "bind": "127.0.0.1",
            "tls_cert_file": str(pki["server"]),
            "tls_key_file": str(pki["server-key"]),
            "refresh_seconds": 1.0,
            "login_attempts": 5,
            "lockout_minutes": 1,
        },
        hl7={"port": hl7_port, "bind": "127.0.0.1"},
        delivery={"max_attempts": 2, "retry_backoff_seconds": 0.2, "retry_max_seconds": 1},
        reconcile={"interval_seconds": 0.5, "recheck_seconds": 0},
    )
    try:
        _add_user(node, READER, "reader")
        _add_user(node, ADMIN, "admin")
        yield Site(node, orthanc, f"https://127.0.0.1:{web_port}", pki["ca"], hl7_port, workdir)
    finally:
        assert node.stop() == 0
        orthanc.stop()
    log = node.log()
    for value in (
        SYNTHETIC_PATIENT_NAME,
        SYNTHETIC_PATIENT_ID,
        SYNTHETIC_ACCESSION,
        HOSTILE_NAME,
        HOSTILE_DESCRIPTION,
        READER[1],
        ADMIN[1],
    ):
        assert value not in log, f"{value!r} reached the node's log"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as session:
        yield session


def sign_in(browser: Any, site: Site, user: tuple[str, str], target: str = "/worklist") -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{site.base}{target}")
    assert "/signin" in browser.current_url  # every page starts with the sign-in
    browser.find_element(By.ID, "username").send_keys(user[0])
    browser.find_element(By.ID, "password").send_keys(user[1])
    browser.find_element(By.ID, "submit").click()
    try:
        wait_for(lambda: "/signin" not in browser.current_url, 20, what="the sign-in to finish")
    except AssertionError:
        print(browser.page_source)
        raise


def rows_of(browser: Any) -> list[str]:
    """The studies on the open worklist, read in one go (the page rebuilds its rows)."""
    return list(
        browser.execute_script(
            "return Array.from(document.querySelectorAll('#rows tr'), r => r.dataset.study);"
        )
    )


def open_row(browser: Any, study_uid: str) -> None:
    """Click the study's row; a refresh may replace the row between finding and clicking."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        try:
            browser.find_element(By.CSS_SELECTOR, f'#rows tr[data-study="{study_uid}"] td').click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError("the row kept being replaced")


def csp_violations(browser: Any) -> list[str]:
    """Console messages since the last call that say the page broke its own policy."""
    return [
        str(e["message"])
        for e in browser.get_log("browser")
        if "Content Security Policy" in str(e["message"])
    ]


def main_text(browser: Any) -> str:
    """The text of the page's <main>, read in one go: "" while a form's POST and its redirect are
    still loading (an element found then can vanish before its text is read)."""
    return str(
        browser.execute_script(
            "const m = document.querySelector('main'); return m === null ? '' : m.innerText;"
        )
    )


def image_loaded(browser: Any, css: str) -> bool:
    return bool(
        browser.execute_script(
            "const i = document.querySelector(arguments[0]);"
            "return i !== null && i.complete && i.naturalWidth > 0;",
            css,
        )
    )


def test_every_page_needs_a_session(site: Site) -> None:
    anonymous = site.client()
    for path in ("/", "/worklist", "/dashboard", "/studies/1.2.3", "/worklist?point=x"):
        answer = anonymous.get(site.base + path, allow_redirects=False)
        if path == "/":
            assert answer.status_code == 303 and answer.headers["location"] == "/worklist"
            continue
        assert answer.status_code == 303, path
        location = urllib.parse.urlparse(answer.headers["location"])
        assert location.path == "/signin", path
    assert anonymous.get(site.base + "/api/worklist").status_code == 401
    assert anonymous.get(site.base + "/studies/1.2.3/images/1.2.4/source.png").status_code == 401
    answer = anonymous.post(site.base + "/dashboard/outbox/retry", allow_redirects=False)
    assert answer.status_code == 303
    huge = anonymous.post(site.base + "/signin", data={"username": "x" * 100_000})
    assert huge.status_code == 413  # forms are parsed in memory: no large bodies
    _, report = site.node.status()  # checked against docs/status.schema.json
    assert report["web"] == {"port": report["web"]["port"], "tls": True, "listening": True}
    headers = anonymous.get(site.base + "/signin").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" in headers


def test_flagged_study_in_worklist_then_reported(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    [(path, study_uid)] = site.studies(1, BodyPartExamined="HAND")
    sign_in(browser, site, READER)
    assert browser.current_url.endswith("/worklist")
    cookie = browser.get_cookie("triage_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

    site.via_orthanc(path)
    wait_for(lambda: site.flagged(study_uid), 120, what="the study to be flagged")
    flagged = time.monotonic()
    wait_for(lambda: study_uid in rows_of(browser), 3, what="the row on the open worklist")
    print(f"worklist showed the flagged study {time.monotonic() - flagged:.2f} s after its flag")
    wait_for(lambda: site.delivered(study_uid), 60, what="the results in Orthanc")
    screenshot(browser, "worklist")

    open_row(browser, study_uid)
    wait_for(lambda: "/studies/" in browser.current_url, 20, what="the study page")
    wait_for(lambda: image_loaded(browser, "img.heatmap"), 20, what="the heatmap thumbnail")
    assert image_loaded(browser, "img.source")
    page = main_text(browser)
    assert "Probability" in page and "tiny-test 0.0.1" in page
    assert browser.find_element(By.ID, "patient-name").text == "SYNTHETIC PATIENT"
    timeline = browser.find_element(By.ID, "timeline").text
    for step in ("received", "queued", "analysed", "flagged", "delivered"):
        assert step in timeline, step
    assert "ORTHANC@127.0.0.1" in browser.find_element(By.ID, "deliveries").text
    screenshot(browser, "study")
    assert csp_violations(browser) == []  # the pages keep to their own policy

    browser.find_element(By.CSS_SELECTOR, "#mark-reported button").click()
    wait_for(
        lambda: "marked by rita" in main_text(browser),
        20,
        what="the study page to say reported",
    )
    browser.get(f"{site.base}/worklist")
    assert study_uid not in rows_of(browser)
    [row] = site.node.sql(
        "SELECT reported_at, report_source, reported_by FROM studies WHERE study_uid = :uid",
        uid=study_uid,
    )
    assert row["report_source"] == "web" and row["reported_by"] == "rita"
    listed = json.loads(site.node.command("worklist", "--json").stdout)
    assert study_uid not in {e["study_uid"] for e in listed}  # the CLI's worklist agrees

    # The other report paths agree: the RIS's ORU^R01 is acknowledged and changes nothing,
    # and the C-FIND look-up in Orthanc (which holds only the node's own objects) does not
    # take the report back.
    answer = send("127.0.0.1", site.hl7_port, oru("F", SYNTHETIC_ACCESSION, zds=study_uid), 10)
    message = parse(answer.decode())
    assert message.component(message.all("MSA")[0], 1) == "AA"
    time.sleep(1.5)  # a reconciliation round or more
    [again] = site.node.sql(
        "SELECT reported_at, report_source, reported_by FROM studies WHERE study_uid = :uid",
        uid=study_uid,
    )
    assert again == row
    events = site.node.sql(
        "SELECT username, action, target FROM audit_events WHERE action = 'mark_reported'"
    )
    assert {"username": "rita", "action": "mark_reported", "target": study_uid} in events


def test_hostile_strings_render_as_text(site: Site, browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    [(path, study_uid)] = site.studies(
        1,
        PatientName=HOSTILE_NAME,
        StudyDescription=HOSTILE_DESCRIPTION,
        BodyPartExamined=HOSTILE_BODY_PART,
    )
    result = storescu(site.node.port, [path])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: site.flagged(study_uid), 120, what="the hostile study to be flagged")
    sign_in(browser, site, READER)
    wait_for(lambda: study_uid in rows_of(browser), 10, what="the hostile study's row")
    row = browser.execute_script(
        "return document.querySelector(arguments[0]).textContent;",
        f'#rows tr[data-study="{study_uid}"]',
    )
    assert HOSTILE_BODY_PART in row
    browser.get(f"{site.base}/studies/{study_uid}")
    assert browser.find_element(By.ID, "patient-name").text == HOSTILE_NAME
    assert browser.find_element(By.ID, "description").text == HOSTILE_DESCRIPTION
    assert HOSTILE_BODY_PART in browser.find_element(By.ID, "body-part").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img[src='x']") == []
    time.sleep(1.0)  # an image error handler would have run by now
    assert browser.execute_script("return window.__xss === undefined")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.accept()
    assert csp_violations(browser) == []
    screenshot(browser, "study-hostile")


def test_post_without_csrf_token_is_refused(site: Site) -> None:
    [(path, study_uid)] = site.studies(1)
    assert storescu(site.node.port, [path]).returncode == 0
    wait_for(lambda: site.flagged(study_uid), 120, what="the study to be flagged")
    reader = site.session(READER)
    target = f"{site.base}/studies/{study_uid}/reported"
    assert reader.post(target, data={}, allow_redirects=False).status_code == 403
    assert reader.post(target, data={"csrf_token": "x" * 43}).status_code == 403
    page = reader.get(f"{site.base}/studies/{study_uid}").text
    forged = reader.post(
        target,
        data={"csrf_token": _csrf(page)},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert forged.status_code == 403  # the right token from another site's page
    assert site.node.sql(
        "SELECT reported_at FROM studies WHERE study_uid = :uid", uid=study_uid
    ) == [{"reported_at": None}]


def test_a_reader_cannot_reach_admin_actions(site: Site) -> None:
    reader = site.session(READER)
    assert reader.get(f"{site.base}/dashboard").status_code == 403
    token = _csrf(reader.get(f"{site.base}/worklist").text)
    answer = reader.post(f"{site.base}/dashboard/outbox/retry", data={"csrf_token": token})
    assert answer.status_code == 403


def test_dashboard_shows_a_destination_down_and_retries_a_dead_item(
    site: Site, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    site.orthanc.stop()
    try:
        [(path, study_uid)] = site.studies(1)
        assert storescu(site.node.port, [path]).returncode == 0
        wait_for(
            lambda: (
                site.node.sql(
                    "SELECT count(*) AS n FROM outbox o JOIN studies s ON s.id = o.study_id "
                    "WHERE s.study_uid = :uid AND o.state = 'DEAD'",
                    uid=study_uid,
                )[0]["n"]
                > 0
            ),
            120,
            what="a dead outbox item while Orthanc is down",
        )
        sign_in(browser, site, ADMIN, "/dashboard")
        wait_for(lambda: "/dashboard" in browser.current_url, 10, what="the dashboard")
        destinations = browser.find_element(By.ID, "destinations").text
        assert "DOWN" in destinations, destinations
        assert "Needs attention" in browser.find_element(By.ID, "health").text
        screenshot(browser, "dashboard-destination-down")
    finally:
        site.orthanc.start()
    browser.get(f"{site.base}/dashboard")
    first = browser.find_element(By.CSS_SELECTOR, "#dead tbody tr")
    item = int(first.find_element(By.TAG_NAME, "td").text)
    first.find_element(By.CSS_SELECTOR, "button.retry").click()  # one item

    def state(item_id: int) -> str:
        return str(site.node.sql("SELECT state FROM outbox WHERE id = :i", i=item_id)[0]["state"])

    wait_for(lambda: state(item) == "SENT", 60, what="the retried item in Orthanc")
    browser.find_element(By.ID, "retry-all").click()  # and the rest
    wait_for(lambda: site.delivered(study_uid), 60, what="every retried item in Orthanc")
    browser.get(f"{site.base}/dashboard")
    assert "outbox_retry" in browser.find_element(By.ID, "audit").text
    screenshot(browser, "dashboard")


def test_the_users_command(site: Site) -> None:
    node = site.node
    assert node.command("users", "add", "rita", input_text="another password\n").returncode == 1
    short = node.command("users", "add", "sam", input_text="short\n")
    assert short.returncode == 2 and "at least 10" in short.stderr
    bad = node.command("users", "add", "<b>", input_text="long enough pw\n")
    assert bad.returncode == 2
    assert node.command("users", "add", "sam", input_text="sams password\n").returncode == 0
    sam = site.session(("sam", "sams password"))
    assert sam.get(f"{site.base}/api/worklist").status_code == 200
    changed = node.command("users", "passwd", "sam", input_text="sams new password\n")
    assert changed.returncode == 0
    assert sam.get(f"{site.base}/api/worklist").status_code == 401  # the session ended
    site.session(("sam", "sams new password"))
    listed = node.command("users", "list").stdout
    assert "sam\treader" in listed and "adam\tadmin" in listed
    assert "password" not in listed.lower()
    assert node.command("users", "remove", "sam").returncode == 0
    assert node.command("users", "remove", "sam").returncode == 1


def test_ten_wrong_passwords_lock_the_user_out(site: Site) -> None:
    """From another loopback address (127.0.0.2), so the lock-out of that address does not
    lock the other tests out; the user name is locked wherever the guesses come from."""
    context = ssl.create_default_context(cafile=str(site.ca))
    port = int(urllib.parse.urlparse(site.base).port or 443)

    def attempt(password: str) -> int:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, context=context, source_address=("127.0.0.2", 0), timeout=30
        )
        try:
            connection.request("GET", "/signin")
            form = connection.getresponse()
            cookie = form.getheader("set-cookie", "").split(";", 1)[0]
            token = _csrf(form.read().decode())
            body = urllib.parse.urlencode(
                {"csrf_token": token, "username": ADMIN[0], "password": password, "next": "/"}
            )
            connection.request(
                "POST",
                "/signin",
                body=body,
                headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie},
            )
            answer = connection.getresponse()
            answer.read()
            return answer.status
        finally:
            connection.close()

    statuses = [attempt(f"wrong guess {n}") for n in range(10)]
    assert statuses[:4] == [401] * 4
    assert 429 in statuses and statuses[-1] == 429
    reader = site.client()  # a wrong password keeps where the reader was going
    form = reader.get(f"{site.base}/signin?next=/dashboard").text
    answer = reader.post(
        f"{site.base}/signin",
        data={"csrf_token": _csrf(form), "username": READER[0], "password": "no", "next": "/x"},
    )
    assert answer.status_code == 401 and 'name="next" value="/x"' in answer.text
    assert attempt(ADMIN[1]) == 429  # the right password, but locked: nothing learnt
    events = site.node.sql(
        "SELECT action, count(*) AS n FROM audit_events WHERE username = :u GROUP BY action",
        u=ADMIN[0],
    )
    counts = {e["action"]: e["n"] for e in events}
    assert counts["sign_in_failed"] >= 5 and counts["sign_in_locked"] >= 1
