"""A real headless Chromium for the web tests: Debian's ``chromium`` driven through its own
``chromium-driver`` by Selenium. Nothing is downloaded: both paths are given, so Selenium
Manager is never asked to find (or fetch) a browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.peers import REPO, missing

ARTIFACTS = REPO / "test-artifacts" / "web"


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium session (Selenium WebDriver), closed afterwards."""
    browser = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if browser is None or driver is None:
        missing("chromium and chromedriver", "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--ignore-certificate-errors",  # the tests' own CA signs the node's certificate
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=Service(executable_path=str(driver)))
    session.set_page_load_timeout(60)
    try:
        yield session
    finally:
        session.quit()


def screenshot(session: object, name: str) -> Path:
    """Save the page as ``test-artifacts/web/NAME.png`` (kept after the run)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    session.save_screenshot(str(path))  # type: ignore[attr-defined]
    return path
