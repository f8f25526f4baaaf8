"""A headless Chromium driven by selenium, for the review page's browser tests, its benchmark and its screenshot.

Optional: needs ``pip install selenium`` and a Chromium with its driver (Debian: ``apt-get install chromium
chromium-driver``). :func:`find_browser` says what is missing instead of raising, so callers can skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
DRIVERS = ("chromedriver",)


@dataclass(frozen=True)
class Browser:
    """The headless browser to drive: a Chrome/Chromium binary and its chromedriver."""

    binary: str
    driver: str


def find_browser() -> tuple[Browser | None, str]:
    """(the browser, "") or (None, what is missing and how to install it)."""
    if importlib.util.find_spec("selenium") is None:
        return None, "selenium is not installed (pip install selenium, or pip install -e '.[test]')"
    binary = os.environ.get("SDTUNE_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("SDTUNE_CHROMEDRIVER") or next(filter(None, map(shutil.which, DRIVERS)), None)
    if binary is None or driver is None:
        missing = " and ".join(n for n, v in (("chromium", binary), ("chromedriver", driver)) if v is None)
        return None, f"{missing} not found (Debian: apt-get install chromium chromium-driver)"
    return Browser(binary, driver), ""


def start_chrome(browser: Browser, width: int = 1400, height: int = 1000) -> Any:
    """A headless Chrome session that records the console (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser.binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(browser.driver), options=options)


def page_url(page: Path) -> str:
    """The ``file://`` URL of ``page``."""
    return Path(page).resolve().as_uri()


def wait_ready(driver: Any, timeout: float = 60) -> None:
    """Until the page's script has drawn the grid (it sets ``body[data-ready]``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's entries of level SEVERE or ERROR."""
    return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]


def screenshot(page: Path, target: Path, width: int = 1400, height: int = 1800) -> None:
    """A PNG of the page's top ``height`` pixels (docs/review.png is made so); written atomically."""
    from sdtune.atomic import atomic_path

    browser, missing = find_browser()
    if browser is None:
        raise RuntimeError(f"no headless browser for the screenshot: {missing}")
    driver = start_chrome(browser, width, height)
    try:
        driver.get(page_url(page))
        wait_ready(driver)
        driver.execute_script("return Promise.all(Array.from(document.images).map("
                              "i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })))")
        with atomic_path(target) as tmp:
            if not driver.save_screenshot(str(tmp)):
                raise RuntimeError(f"the browser did not write the screenshot {target}")
    finally:
        driver.quit()


if __name__ == "__main__":  # python -m sdtune.review.browser PAGE PNG [WIDTH HEIGHT]
    import sys

    sizes = [int(v) for v in sys.argv[3:5]]
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]), *sizes)
