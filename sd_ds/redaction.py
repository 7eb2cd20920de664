"""Credentials out of everything sd-ds writes down or prints: one helper for every URL that is stored or shown.

A URL may carry a secret in two places: its userinfo (``https://user:TOKEN@host/...``, a basic-auth URL) and its
query (presigned S3 ``X-Amz-Signature``/``X-Amz-Credential``/``X-Amz-Security-Token``, GCS ``X-Goog-Signature``,
Azure SAS ``sig``, generic ``token``/``access_token``/``key``, ...). ``redact_url`` replaces those values with
``***`` and keeps the rest (scheme, host, path, harmless parameters), so a redacted URL still says which shard
or part was meant. ``redact_text`` does it to every URL inside free text (a log line, an exception message, a
command line), ``redact_json`` to every string inside a JSON-like value (a saved config).

What is redacted is only what is *written down or printed*: the reader still opens the real URL. ``s3://`` and
``gs://`` URLs take their keys from the environment and carry none, so they pass unchanged.

``guard_console()`` puts a redacting wrapper around ``sys.stdout`` and ``sys.stderr`` of a command's process:
log lines, warnings, progress bars and tracebacks, including those of libraries (fsspec and aiohttp put the URL
into their exception messages), are redacted before they reach the terminal or a log file.

``python -m sd_ds.redaction --holds-secret ARG...`` exits 0 when an argument holds a credential (run.sh then
passes the trainer's flags through a private file instead of a command line that the launcher prints).
"""

from __future__ import annotations

import io
import re
import sys
from typing import Any, Optional, TextIO
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Query parameters whose value is a credential (compared lower-case), and name endings that mark one.
SECRET_PARAMETERS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "sig", "token", "access_token", "id_token",
    "refresh_token", "session_token", "security_token", "auth", "authorization", "key", "api_key", "apikey",
    "api-key", "x-api-key", "password", "passwd", "pass", "secret", "client_secret", "credential", "credentials",
    "jwt", "code",
})
SECRET_SUFFIXES = ("token", "secret", "signature", "password", "credential", "_key", "-key", "apikey")

# A URL inside text: scheme://, then anything up to whitespace, a quote or a bracket that ends it in a message.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def is_secret_parameter(name: str) -> bool:
    name = name.strip().lower()
    return name in SECRET_PARAMETERS or name.endswith(SECRET_SUFFIXES)


def redact_url(url: str) -> str:
    """``url`` with the userinfo and the values of credential-bearing query parameters replaced by ``***``;
    anything else (a local path, ``s3://bucket/key``) unchanged. A string that holds URLs among other words
    (a ``pipe:curl ... URL`` shard) has each of them redacted."""
    if "://" not in url:
        return url
    if not _URL_IN_TEXT.fullmatch(url):
        return redact_text(url)
    return _redact_one(url)


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL (e.g. a bracket in the host): mask everything after the scheme
        return url.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query and any(is_secret_parameter(name) for name, _ in parse_qsl(query, keep_blank_values=True)):
        query = "&".join(_redact_parameter(item) for item in query.split("&"))
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_parameter(item: str) -> str:
    name, sep, _ = item.partition("=")
    return f"{name}={MASK}" if sep and is_secret_parameter(unquote_plus(name)) else item


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (``redact_url``)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _redact_in_text(m.group(0)), text)


def _redact_in_text(match: str) -> str:
    # Punctuation that ends a sentence or a bracket around the URL is the text's, not the URL's.
    url = match.rstrip(").,;:!]}")
    return _redact_one(url) + match[len(url):]


def redact_json(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples as lists, strings, numbers) with every string
    redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_json(v) for v in value]
    return value


def holds_secret(text: str) -> bool:
    """True when ``text`` holds a URL with a credential."""
    return redact_text(text) != text


def redact_argv(argv: list[str]) -> list[str]:
    return [redact_text(a) for a in argv]


# --- the console ------------------------------------------------------------------------------------------

class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written to it and passes it on; everything else (fileno, isatty,
    encoding, ...) is the wrapped stream's, so progress bars and loggers treat it as the terminal it wraps."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact_text(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self.stream, "encoding", None)

    @property
    def errors(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self.stream, "errors", None)

    @property
    def buffer(self) -> Any:
        return self.stream.buffer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guard_console() -> None:
    """Redact this process's stdout and stderr from now on (idempotent). Call first in a command's ``main``,
    before logging is configured (a logging handler keeps the stream it was given)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
