"""``sdtune review``: write the dataset page (and optionally serve it on this machine)."""

from __future__ import annotations

import functools
import http.server
import logging
import re
import socket
import time
from pathlib import Path

from sdtune.atomic import write_text_atomic
from sdtune.errors import SdtuneError
from sdtune.review.collect import PAGE_FILE, THUMB_DIR, Review, ReviewOptions, collect
from sdtune.review.page import render

logger = logging.getLogger(__name__)

_THUMB_NAME = re.compile(r"[0-9a-f]{32}-\d+\.jpg")


@functools.lru_cache(maxsize=None)
def _quiet_handler(directory: str) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            logger.debug("%s %s", self.address_string(), format % args)

    return Handler


def write_review(options: ReviewOptions) -> tuple[Path, Review]:
    """Collect, write ``<out>/index.html`` atomically, and remove thumbnails no image uses any more; returns the
    page's path and what it shows."""
    started = time.perf_counter()
    review = collect(options)
    page = Path(options.out) / PAGE_FILE
    write_text_atomic(page, render(review))
    used = {i.thumb for i in review.items if i.thumb}
    for old in (Path(options.out) / THUMB_DIR).iterdir():
        if _THUMB_NAME.fullmatch(old.name) and old.name not in used:  # only our own thumbnails
            old.unlink()
    logger.info("wrote %s (%d images, %.1f s)", page, len(review.items), time.perf_counter() - started)
    return page, review


def make_server(folder: Path, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``folder`` (port 0: any free one; ``server.server_address[1]`` says which)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this machine can read the page and its thumbnails", host)
    server_class = http.server.ThreadingHTTPServer
    if ":" in host:  # an IPv6 address
        server_class = type("ThreadingHTTPServer6", (server_class,), {"address_family": socket.AF_INET6})
    try:
        return server_class((host, port), _quiet_handler(str(folder)))
    except OSError as exc:
        raise SdtuneError(f"cannot serve {folder} on {host}:{port} ({exc.strerror or exc}); choose another --port "
                          "(0: any free one) or --host") from None


def serve(folder: Path, host: str, port: int) -> None:
    """Serve ``folder`` over HTTP until Ctrl-C."""
    server = make_server(folder, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving http://{shown}:{server.server_address[1]}/{PAGE_FILE} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped serving", flush=True)  # Ctrl-C is how serving ends: a normal exit
    finally:
        server.server_close()


def review_command(options: ReviewOptions) -> int:
    """``sdtune review``: write the page, print its path, then with --serve serve it; returns 0."""
    page, review = write_review(options)
    print(page.resolve())
    if options.serve:
        serve(Path(options.out), options.host, options.port)
    return 0


__all__ = ["ReviewOptions", "make_server", "review_command", "serve", "write_review"]
