"""URL download inside the curate plan: fills ``media`` of manifest records that carry a ``url``.

    ds = ds.map_batches(download_batch, fn_kwargs={"cfg": source_cfg}, batch_format="pyarrow")

Per batch, a thread pool of ``download_threads`` fetches the URLs through one ``urllib3``
PoolManager per worker process: ``download_per_host`` connections per host (``block=True``: a
request waits for a free connection, so one slow host cannot take every thread's socket),
``download_timeout_s`` for connect and for each read, ``download_total_timeout_s`` for the
whole response including retries, ``download_retries`` retries with exponential backoff from
``download_backoff_s`` on 429/5xx, timeouts and dropped connections, redirects followed up to
``download_max_redirects``. A response whose ``X-Robots-Tag`` carries one of ``opt_out_tags``
(``noai``, ``noimageai``) is rejected as ``opt_out``: the publisher's opt-out is honoured.

Reject reasons (``error`` of the record): ``opt_out``, ``http_error`` (detail: the status),
``download_timeout``, ``download_error`` (DNS, refused, reset, too many redirects),
``download_truncated`` (fewer bytes than Content-Length), ``file_too_large``.

Tested in tests/test_sources.py against a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import pyarrow as pa

from pipelines.sources import SourceConfig

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(Exception):
    def __init__(self, reason: str, detail: str, retry: bool = False):
        super().__init__(reason, detail)
        self.reason, self.detail, self.retry = reason, detail, retry


@lru_cache(maxsize=4)
def _pool(per_host: int, user_agent: str):
    import urllib3

    return urllib3.PoolManager(num_pools=256, maxsize=per_host, block=True,
                               headers={"User-Agent": user_agent, "Accept": "image/*,video/*,*/*;q=0.5"})


def fetch(url: str, cfg: SourceConfig) -> bytes:
    """One URL → bytes, or raise DownloadError (after retries)."""
    deadline = time.monotonic() + cfg.download_total_timeout_s
    backoff = cfg.download_backoff_s
    attempt = 0
    while True:
        try:
            return _fetch_once(url, cfg, deadline)
        except DownloadError as e:
            attempt += 1
            wait = backoff * (2 ** (attempt - 1))
            if not e.retry or attempt > cfg.download_retries or time.monotonic() + wait >= deadline:
                raise
            time.sleep(wait)


def _fetch_once(url: str, cfg: SourceConfig, deadline: float) -> bytes:
    import urllib3
    from urllib3.exceptions import HTTPError, MaxRetryError, ProtocolError, ReadTimeoutError, TimeoutError

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DownloadError("download_timeout", f"over {cfg.download_total_timeout_s} s")
    timeout = urllib3.Timeout(connect=min(cfg.download_timeout_s, remaining),
                              read=min(cfg.download_timeout_s, remaining))
    retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                            redirect=cfg.download_max_redirects, raise_on_redirect=True)
    try:
        r = _pool(cfg.download_per_host, cfg.user_agent).request(
            "GET", url, preload_content=False, timeout=timeout, retries=retries, redirect=True)
    except MaxRetryError as e:
        cause = e.reason
        if isinstance(cause, (ReadTimeoutError, TimeoutError)):
            raise DownloadError("download_timeout", str(cause)[:160], retry=True) from None
        if "redirect" in str(e).lower():
            raise DownloadError("download_error", "too many redirects") from None
        raise DownloadError("download_error", str(cause)[:160], retry=True) from None
    except (TimeoutError, ReadTimeoutError) as e:
        raise DownloadError("download_timeout", str(e)[:160], retry=True) from None
    except (HTTPError, OSError, ValueError) as e:
        raise DownloadError("download_error", f"{type(e).__name__}: {str(e)[:160]}", retry=True) from None
    try:
        tags = {t.strip().lower() for v in r.headers.getlist("X-Robots-Tag") for t in v.replace(":", ",").split(",")}
        if tags & set(cfg.opt_out_tags):
            raise DownloadError("opt_out", "X-Robots-Tag: " + ", ".join(sorted(tags & set(cfg.opt_out_tags))))
        if r.status != 200:
            raise DownloadError("http_error", str(r.status), retry=r.status in _RETRY_STATUS)
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > cfg.max_media_bytes:
            raise DownloadError("file_too_large", f"Content-Length {length}")
        chunks, total = [], 0
        for chunk in r.stream(1 << 16):
            total += len(chunk)
            if total > cfg.max_media_bytes:
                raise DownloadError("file_too_large", f"> {cfg.max_media_bytes} bytes")
            if time.monotonic() > deadline:
                raise DownloadError("download_timeout", f"body over {cfg.download_total_timeout_s} s")
            chunks.append(chunk)
        return b"".join(chunks)
    except ProtocolError as e:
        if "IncompleteRead" in str(e) or "incomplete" in str(e).lower():
            raise DownloadError("download_truncated", str(e)[:160]) from None
        raise DownloadError("download_error", str(e)[:160], retry=True) from None
    except (ReadTimeoutError, TimeoutError) as e:
        raise DownloadError("download_timeout", str(e)[:160], retry=True) from None
    except HTTPError as e:
        raise DownloadError("download_error", f"{type(e).__name__}: {str(e)[:160]}", retry=True) from None
    finally:
        r.release_conn()


def download_batch(batch: pa.Table, cfg: SourceConfig) -> pa.Table:
    """Records with a ``url``, no ``media`` and no ``error`` get their bytes or a reject reason."""
    urls = batch.column("url").to_pylist()
    media = batch.column("media").to_pylist()
    errors = batch.column("error").to_pylist()
    todo = [i for i, u in enumerate(urls) if u and media[i] is None and not errors[i]]
    if not todo:
        return batch
    details = batch.column("error_detail").to_pylist()
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            data = fetch(urls[i], cfg)
            with lock:
                media[i] = data
        except DownloadError as e:
            with lock:
                errors[i], details[i] = e.reason, e.detail
        except Exception as e:  # noqa: BLE001 - one bad URL never stops a run
            with lock:
                errors[i], details[i] = "download_error", f"{type(e).__name__}: {str(e)[:160]}"

    with ThreadPoolExecutor(max_workers=min(cfg.download_threads, len(todo))) as pool:
        list(pool.map(one, todo))
    for name, values, typ in (("media", media, pa.binary()), ("error", errors, pa.string()),
                              ("error_detail", details, pa.string())):
        batch = batch.set_column(batch.column_names.index(name), name, pa.array(values, typ))
    return batch


__all__ = ["download_batch", "fetch", "DownloadError"]
