"""URL download inside the curate plan: fills ``media`` of manifest records that carry a ``url``.

    for chunk in download_chunks(batch, source_cfg):   # in a process task: curate.download_and_process
        yield process_batch(chunk, cfg)

As img2dataset does it: each worker process keeps one thread pool of ``download_threads`` and
one ``urllib3`` PoolManager (connections reused per host) for its whole life. ``download_chunks``
streams a block's rows through that pool in input order, ``CHUNK_ROWS`` at a time, keeping up to
``AHEAD_ROWS`` requests (and at most ``AHEAD_BYTES`` of downloaded, not yet consumed bytes) ahead
of its consumer, so the task decodes the first rows while its threads fetch the rest.

``download_per_host`` connections per host per process (``block=True``: a request waits for a free
connection, so one slow host cannot take every thread's socket), ``download_timeout_s`` for
connect and for each read, ``download_total_timeout_s`` for the whole response including retries,
``download_retries`` retries with exponential backoff from ``download_backoff_s`` on 429/5xx,
timeouts and dropped connections, redirects followed up to ``download_max_redirects``. A
response whose ``X-Robots-Tag`` carries one of ``opt_out_tags`` (``noai``, ``noimageai``) is
rejected as ``opt_out``: the publisher's opt-out is honoured.

Reject reasons (``error`` of the record): ``opt_out``, ``http_error`` (detail: the status),
``download_timeout``, ``download_error`` (DNS, refused, reset, too many redirects),
``download_truncated`` (fewer bytes than Content-Length), ``file_too_large``.

Tested in tests/test_sources.py against a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import pyarrow as pa

from pipelines.sources import SourceConfig

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK_ROWS = 64                 # rows per yielded table
AHEAD_ROWS = 256                # requests submitted ahead of the consumer (at least 8 per thread)
AHEAD_BYTES = 64 << 20          # downloaded bytes not yet consumed, per block being streamed


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


@lru_cache(maxsize=4)
def _executor(threads: int) -> ThreadPoolExecutor:
    """The worker process's download threads (kept between tasks, like its connections)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mm-download")


def _outcome(url: str, cfg: SourceConfig) -> tuple[bytes | None, str | None, str | None]:
    try:
        return fetch(url, cfg), None, None
    except DownloadError as e:
        return None, e.reason, e.detail
    except Exception as e:  # noqa: BLE001 - one bad URL never stops a run
        return None, "download_error", f"{type(e).__name__}: {str(e)[:160]}"


def download_chunks(batch: pa.Table, cfg: SourceConfig, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Records with a ``url``, no ``media`` and no ``error`` get their bytes or a reject reason;
    yielded in input order, ``chunk_rows`` rows at a time, while later rows download."""
    urls = batch.column("url").to_pylist()
    media = batch.column("media").to_pylist()
    errors = batch.column("error").to_pylist()
    todo = [i for i, u in enumerate(urls) if u and media[i] is None and not errors[i]]
    if not todo:
        yield batch
        return
    details = batch.column("error_detail").to_pylist()
    pool = _executor(cfg.download_threads)
    ahead = max(AHEAD_ROWS, 8 * cfg.download_threads)
    futures: dict[int, Future] = {}
    held = [0]  # bytes downloaded and not yet yielded
    lock = threading.Lock()
    submitted = 0

    def done(f: Future) -> None:  # in the download thread
        if not f.cancelled() and f.result()[0] is not None:
            with lock:
                held[0] += len(f.result()[0])

    def submit_more() -> None:
        nonlocal submitted
        while submitted < len(todo) and len(futures) < ahead and held[0] < AHEAD_BYTES:
            i = todo[submitted]
            futures[i] = pool.submit(_outcome, urls[i], cfg)
            futures[i].add_done_callback(done)
            submitted += 1

    try:
        for start in range(0, batch.num_rows, chunk_rows):
            stop = min(start + chunk_rows, batch.num_rows)
            for i in range(start, stop):
                submit_more()  # rows are submitted in order, so row i is in flight once earlier rows are consumed
                f = futures.pop(i, None)
                if f is None:  # not to download
                    continue
                media[i], err, detail = f.result()
                if err:
                    errors[i], details[i] = err, detail
                else:
                    with lock:
                        held[0] -= len(media[i])
            chunk = batch.slice(start, stop - start)
            for name, values, typ in (("media", media, pa.binary()), ("error", errors, pa.string()),
                                      ("error_detail", details, pa.string())):
                chunk = chunk.set_column(chunk.column_names.index(name), name, pa.array(values[start:stop], typ))
            media[start:stop] = [None] * (stop - start)  # the chunk holds them now
            yield chunk
    finally:
        for f in futures.values():
            f.cancel()


def download_batch(batch: pa.Table, cfg: SourceConfig) -> pa.Table:
    """``download_chunks`` as one table (tests, small batches)."""
    return pa.concat_tables(list(download_chunks(batch, cfg)))


__all__ = ["download_batch", "download_chunks", "fetch", "DownloadError"]
