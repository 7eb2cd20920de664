"""Transient storage errors: which failures are worth trying again, and the bounded backoff that does.

Object stores and CDNs answer a request now and then with HTTP 503 (S3: ``SlowDown``), drop a connection or time
out. Such a failure says nothing about the data: the same read a moment later succeeds. ``is_transient`` tells
them from errors that are the data's (a 404, a tar that does not parse, a 403 for a wrong credential), also when
a library wrapped them (fsspec turns a failed HTTP GET into ``FileNotFoundError`` with the 503 as its cause; s3fs
turns botocore's ``ClientError`` into ``OSError``).

``Backoff`` retries with exponentially growing waits (``first_delay_s`` doubling up to ``max_delay_s``) for as long
as a run of consecutive failures lasts less than ``timeout_s``; then it raises ``StorageUnavailable``, one line
naming what was read and the last error. The caller retries at the level where a retry restarts the read at the
right place: a metadata file is read again whole (``retrying``), a shard is reopened at the sample it was
reading (``sd_ds.data.reading.SourceCursor``), so a run under a flaky store serves exactly the samples of a run
without failures.

The trainer sets the process's policy from ``--storage_retry_timeout`` (``set_default_policy``); data-loader
workers get it with their dataset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from sd_ds.redaction import redact_text

logger = logging.getLogger("sd_ds.retries")

T = TypeVar("T")

# HTTP statuses that a later request may not get: timeouts, throttling, server errors (not 501/505: permanent).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 507, 509, 520, 521, 522, 523, 524, 529, 598,
                                599})
# botocore ClientError codes of the same kind (S3, GCS through its S3 API).
TRANSIENT_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                             "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
                             "ProvisionedThroughputExceededException", "503", "500", "502", "504"})
# Exception classes, by name so that neither aiohttp nor botocore need be installed: a connection or a response
# body that broke off, a read that timed out.
TRANSIENT_CLASSES = frozenset({
    "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError", "ClientPayloadError",
    "ContentLengthError", "TransferEncodingError", "ClientConnectorError", "SocketTimeoutError",
    "ConnectionTimeoutError", "FSTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
    "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError", "IncompleteRead",
    "ProtocolError",
})


def _status(exc: BaseException) -> Optional[int]:
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata") or {}
        if isinstance(meta.get("HTTPStatusCode"), int):
            return int(meta["HTTPStatusCode"])
    return None


def _code(exc: BaseException) -> Optional[str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "") or None
    return None


def _transient_itself(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):  # resets, refusals, broken pipes; socket.timeout
        return True
    if any(cls.__name__ in TRANSIENT_CLASSES for cls in type(exc).__mro__):
        return True
    if _code(exc) in TRANSIENT_CODES:
        return True
    status = _status(exc)
    return status is not None and status in TRANSIENT_STATUSES


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a failure of the store, not of the data."""
    seen: set[int] = set()
    pending: list[Optional[BaseException]] = [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen or len(seen) > 16:
            continue
        seen.add(id(e))
        if _transient_itself(e):
            return True
        pending += [e.__cause__, e.__context__]
    return False


class StorageUnavailable(RuntimeError):
    """The store kept failing a read for longer than the retry policy allows (a one-line message)."""

    def one_line(self) -> str:
        """The message, also when a DataLoader worker raised it (torch re-raises it in the main process with the
        worker's whole traceback as its message)."""
        text = str(self)
        marker = f"{type(self).__name__}: "
        if "Traceback" in text and marker in text:
            text = text.rsplit(marker, 1)[1]
        return text.strip().splitlines()[0] if text.strip() else type(self).__name__


@dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 120.0
    """Give up when consecutive failures of one read have lasted this long (0: never retry)."""
    first_delay_s: float = 0.25
    max_delay_s: float = 8.0


_default = RetryPolicy()


def set_default_policy(policy: RetryPolicy) -> None:
    """The policy of this process's storage reads (the trainer's --storage_retry_timeout)."""
    global _default
    _default = policy


def default_policy() -> RetryPolicy:
    return _default


class Backoff:
    """One read's retries: ``failed(exc, what)`` waits before the next try, or raises StorageUnavailable when the
    failures since the last success have lasted longer than the policy allows; ``succeeded()`` starts afresh.
    ``on_retry(what, exc)`` is called before each wait (counting, logging)."""

    def __init__(self, policy: Optional[RetryPolicy] = None,
                 on_retry: Optional[Callable[[str, BaseException], None]] = None) -> None:
        self.policy = policy or default_policy()
        self.on_retry = on_retry
        self.first_failure: Optional[float] = None
        self.tries = 0
        self.retries = 0  # in all, over this object's life

    def failed(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure, self.tries = now, 0
        self.tries += 1
        waited = now - self.first_failure
        delay = min(self.policy.max_delay_s, self.policy.first_delay_s * 2 ** (self.tries - 1))
        if waited + delay > self.policy.timeout_s:
            raise StorageUnavailable(
                f"{redact_text(what)}: the store kept failing for {waited:.0f} s ({self.tries} tries; the last: "
                f"{describe(exc)}); giving up after --storage_retry_timeout {self.policy.timeout_s:g} s") from None
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(what, exc)
        time.sleep(delay)

    def succeeded(self) -> None:
        self.first_failure, self.tries = None, 0


def describe(exc: BaseException) -> str:
    """One short line for an error: its type and message (of the transient cause when it was wrapped), redacted."""
    cause = exc
    for e in (exc, exc.__cause__, exc.__context__):
        if e is not None and _transient_itself(e):
            cause = e
            break
    text = " ".join(str(cause).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return redact_text(f"{type(cause).__name__}: {text}" if text else type(cause).__name__)


def retrying(read: Callable[[], T], what: str, policy: Optional[RetryPolicy] = None,
             on_retry: Optional[Callable[[str, BaseException], None]] = None) -> T:
    """``read()``, tried again on transient errors (``Backoff``); other errors pass through at once."""
    backoff = Backoff(policy, on_retry or _log_retry)
    while True:
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - sorted by is_transient
            if not is_transient(e):
                raise
            backoff.failed(e, what)


def _log_retry(what: str, exc: BaseException) -> None:
    logger.warning("%s: %s; trying again", redact_text(what), describe(exc))
