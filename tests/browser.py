"""Headless Chromium (the system's /usr/bin/chromium, driven by playwright) with the network off: every
request that does not go to an allowed origin (file:, data:, blob:, and the test's own server) is
aborted and recorded, and so is every request that fails. Set-up installs Chromium (`make setup`)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Browsed:
    page: object
    blocked: list[str] = field(default_factory=list)  # requests to anywhere else (aborted)
    failed: list[str] = field(default_factory=list)  # requests that failed (blocked ones included)
    errors: list[str] = field(default_factory=list)  # uncaught page errors


@contextlib.contextmanager
def browser_page(allow_origin: str | None = None, width: int = 1280, height: int = 720) -> Iterator[Browsed]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="locdiff-chromium-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            seen = Browsed(page)

            def route(r):
                url = r.request.url
                if url.startswith(("file:", "data:", "blob:")) or (
                    allow_origin and url.startswith(allow_origin)
                ):
                    return r.continue_()
                seen.blocked.append(url)
                return r.abort()

            ctx.route("**/*", route)
            page.on("requestfailed", lambda req: seen.failed.append(f"{req.url} ({req.failure})"))
            page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
            yield seen
        finally:
            ctx.close()


def screenshot_is_not_blank(png: bytes) -> tuple[bool, float]:
    """(whether the picture has content, the standard deviation of its grey levels)."""
    import io

    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    sd = float(grey.std())
    return sd > 10.0, sd
