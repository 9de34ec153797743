"""Browser fixtures for the web UI tests: Debian's Chromium driven by Playwright (no browser
download at run time). conftest imports the fixtures, so any test module can ask for
`browser` and `page`; both skip with the reason where Chromium is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
NO_CHROMIUM = "no /usr/bin/chromium (run `make chromium`: apt-get install chromium, as root)"

needs_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_CHROMIUM)


def stop_coordinator(coordinator: Any) -> None:
    """Stop a coordinator that browsers held event streams open on."""
    # Open event streams would hold uvicorn's graceful shutdown forever (the real server
    # sets timeout_graceful_shutdown; the test one does not).
    coordinator.server.force_exit = True
    coordinator.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless=new", "--no-sandbox"]
        )
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # Playwright's polling predicates are evaluated strings, which the page's CSP forbids;
    # without the CSP the escaping checks also rest on the DOM code alone.
    context = browser.new_context(bypass_csp=True)
    pg = context.new_page()
    yield pg
    context.close()


def console_errors(page: Any) -> list[str]:
    """Start collecting the page's console errors and uncaught exceptions; returns the
    list, which fills as they happen (register before `page.goto`)."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    return errors
