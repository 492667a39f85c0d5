"""Fetching image URLs (Conceptual Captions style data): concurrent, bounded in time and size, http(s) only.

Web data is untrusted. A fetch:

* only ever speaks http or https, also after a redirect (no ``file:``, ``ftp:``, ``data:``);
* gives up after ``timeout`` seconds per attempt, however slowly the server trickles bytes;
* refuses bodies over ``max_bytes`` (from the Content-Length header, or while reading);
* retries only what may succeed later (timeouts, dropped connections, HTTP 408/425/429/5xx), at
  most ``retries`` times with exponential backoff; a 404 fails at once.

A failure raises :class:`~m2ib_lightning.data.images.ImageError`: the sample becomes a counted skip
with the reason (``fetch failed: HTTP 404 Not Found``), never an exception in the stream.
Concurrency comes from :func:`ordered_map`, which keeps ``concurrency`` fetches in flight per
dataloader worker while yielding results in input order.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urlsplit

from m2ib_lightning.data.images import ImageError
from m2ib_lightning.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

#: HTTP statuses worth retrying: the server may answer differently a moment later.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: characters left as they are when a URL is re-quoted (reserved ones, and % of existing escapes)
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"


@dataclass
class FetchConfig:
    """How image URLs are fetched.

    Args:
        timeout: seconds per attempt, from connecting to the last byte. A stalled read is noticed
            within another ``timeout`` at worst (the socket timeout), so one attempt never takes
            longer than twice this.
        retries: extra attempts after a transient failure (timeout, dropped connection, HTTP
            408/425/429/5xx); permanent failures (404, too large, refused scheme) are not retried.
        backoff: seconds before the first retry, doubled for each further one.
        max_bytes: largest response body accepted, in bytes.
        concurrency: fetches in flight per dataloader worker (threads).
        user_agent: the User-Agent header sent (some image hosts refuse Python's default).
    """

    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 16 * 2**20
    concurrency: int = 16
    user_agent: str = "m2ib_lightning/0.1 (image-text attribution research)"

    def __post_init__(self) -> None:
        if not isinstance(self.timeout, int | float) or not self.timeout > 0:
            raise ConfigError(f"fetch.timeout must be a number > 0, got {self.timeout!r}")
        if not isinstance(self.backoff, int | float) or not self.backoff >= 0:
            raise ConfigError(f"fetch.backoff must be a number >= 0, got {self.backoff!r}")
        for name, low in (("retries", 0), ("max_bytes", 1), ("concurrency", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"fetch.{name} must be an int >= {low}, got {value!r}")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most 5 redirects, and only to http(s) URLs (urllib alone would follow ``ftp:``)."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageError(f"fetch failed: redirect to a {scheme or 'relative'!r} URL refused: {newurl[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Fetcher:
    """Downloads one URL's bytes under the limits of a :class:`FetchConfig`; thread-safe.

    Example::

        >>> fetch = Fetcher(FetchConfig(timeout=5, retries=1))         # doctest: +SKIP
        >>> data = fetch("https://example.org/cat.jpg")                # doctest: +SKIP
    """

    def __init__(self, config: FetchConfig | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config or FetchConfig()
        self._sleep = sleep
        # Built by hand rather than with build_opener, which would also install file:, ftp: and data: handlers.
        opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),  # honours http(s)_proxy / no_proxy like any HTTP client
            urllib.request.HTTPHandler(),
            urllib.request.HTTPSHandler(),
            _HttpOnlyRedirects(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            opener.add_handler(handler)
        self._opener = opener

    def __call__(self, url: str) -> bytes:
        """The response body of ``url``; raises :class:`ImageError` (``transient`` set if worth retrying)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ImageError(f"fetch refused: only http(s) URLs with a host are fetched, got {url[:200]!r}")
        # Web datasets hold URLs with raw spaces and non-ASCII characters, which browsers escape
        # silently and http.client refuses: escape them the same way (existing %XX escapes are kept).
        url = quote(url, safe=_URL_SAFE)
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            try:
                return self._once(url)
            except ImageError as err:
                if not err.transient or attempt == attempts - 1:
                    if attempt:
                        raise ImageError(f"{err} (after {attempt + 1} attempts)", err.transient) from err
                    raise
            self._sleep(self.config.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _once(self, url: str) -> bytes:
        cfg = self.config
        deadline = time.monotonic() + cfg.timeout
        request = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"})
        try:
            with self._opener.open(request, timeout=cfg.timeout) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > cfg.max_bytes:
                    raise ImageError(f"fetch failed: {length} bytes, more than max_bytes={cfg.max_bytes}")
                chunks, size = [], 0
                while True:
                    if time.monotonic() > deadline:
                        raise ImageError(f"fetch failed: timed out after {cfg.timeout:g} s", transient=True)
                    # read1 returns after one socket read, so the deadline is checked however slow the server is.
                    chunk = response.read1(1 << 16)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        raise ImageError(f"fetch failed: body exceeds max_bytes={cfg.max_bytes}")
                    chunks.append(chunk)
                return b"".join(chunks)
        except ImageError:
            raise
        except urllib.error.HTTPError as err:
            raise ImageError(f"fetch failed: HTTP {err.code} {err.reason}", err.code in TRANSIENT_STATUS) from err
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ImageError):  # raised by the redirect handler, wrapped by urllib
                raise reason from err
            # An unknown host will not appear on a retry; a refused or reset connection might.
            transient = not isinstance(reason, socket.gaierror)
            raise ImageError(f"fetch failed: {reason}", transient) from err
        except TimeoutError as err:
            raise ImageError(f"fetch failed: timed out after {cfg.timeout:g} s", transient=True) from err
        except http.client.InvalidURL as err:
            raise ImageError(f"fetch failed: {err}") from err
        except (ConnectionError, http.client.HTTPException, OSError) as err:
            raise ImageError(f"fetch failed: {type(err).__name__}: {err}", transient=True) from err
        except Exception as err:  # noqa: BLE001 - e.g. http.client.InvalidURL, UnicodeError from a bad host name
            raise ImageError(f"fetch failed: {type(err).__name__}: {err}") from err


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` threads, in input order, with at most ``window`` items in flight.

    ``threads == 1`` runs inline (no thread). The window (default ``2 * threads``) bounds memory
    however slow the consumer is; leaving the loop early cancels what has not started.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    window = window or 2 * threads
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="m2ib-fetch")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
