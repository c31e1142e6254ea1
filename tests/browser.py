"""Headless Debian Chromium for the browser tests (the HTML report in test_report.py, the documentation site in
test_docs.py), driven by selenium with the machine's chromedriver: nothing is downloaded. scripts/setup.sh installs
chromium and chromium-driver as root; without them the tests skip with the fix, except under CI."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def browser_or_skip() -> None:
    """Skip without chromium/chromedriver/selenium, except under CI, where scripts/setup.sh installs them and a
    skip would hide a broken install."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if not missing:
        return
    message = (f"browser test needs {', '.join(missing)}: run scripts/setup.sh as root "
               "(apt-get install chromium chromium-driver)")
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("CI is set, so this must not be skipped: " + message)
    pytest.skip(message)


@contextlib.contextmanager
def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, height: int = 4000) -> Iterator[Any]:
    """A headless Chromium webdriver (1280 px wide) that keeps the browser console's messages
    (``driver.get_log("browser")``); quit on exit."""
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_manager(*args: object, **kwargs: object) -> None:
        raise AssertionError("selenium-manager was asked for a driver or browser: it would try to download one")

    monkeypatch.setattr(selenium_manager.SeleniumManager, "binary_paths", no_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Without the background-networking flags Chromium keeps dialling Google on this closed network and hangs.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1280,{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "cd.log")),
                              options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
