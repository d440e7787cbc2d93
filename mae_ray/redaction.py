"""The one redaction every text leaving the process goes through: console lines (driver and workers),
error messages, MLflow params, tags and artifacts, ``result.json``.

What it hides: credentials in URLs (``scheme://user:pass@host``, signed-URL query parameters),
``Authorization:`` / ``Bearer`` header values, ``key=value`` and ``key: value`` pairs whose key names a
secret (``...password``, ``...token``, ``...secret``, ``..._key``, ``...credentials``), ``curl -u
user:pass``, AWS-style access key ids and PEM private keys. Imports nothing heavy: the CLI wraps its
streams with it before anything else starts.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
from typing import Any, TextIO

MASK = "***"

# query parameters that carry credentials: S3/GCS pre-signed URLs, Azure SAS, bearer tokens in URLs
_SECRET_QUERY = re.compile(r"([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
                           r"X-Goog-Credential|sig|signature|token|access_token|api_key|key)=)[^&\s'\"]+", re.I)
_URL_USER = re.compile(r"://[^/@\s'\"]+@")
_AUTH_HEADER = re.compile(r"(Authorization[\"']?\s*[:=]\s*[\"']?(?:(?:Basic|Bearer|Token|Digest)\s+)?)[^\s'\",;]+",
                          re.I)
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]{6,}")
# a key that names a secret: the whole identifier ends in one of these (mask_token_in_encoder does not)
_SECRET_NAME = r"[A-Za-z0-9_.-]*?(?:password|passwd|passphrase|secret|token|credentials?|[_.-]key|apikey)"
_KEY_VALUE = re.compile(rf"(?<![A-Za-z0-9_.-])({_SECRET_NAME}[\"']?\s*[:=]\s*)"
                        r"(\"[^\"\n]*\"|'[^'\n]*'|(?!\*\*\*)[^\s'\",;&]+)", re.I)
_CURL_USER = re.compile(r"((?:^|\s)(?:-u\s*|--user[\s=]+))[^\s:'\"]+:[^\s'\"]+")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}\b")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)


def redact(value: Any) -> Any:
    """``value`` with every secret it shows replaced by ``***`` (a string, also a whole YAML or log text;
    anything else is returned as it is)."""
    if not isinstance(value, str) or not value:
        return value
    text = _PRIVATE_KEY.sub(MASK, value)
    text = _URL_USER.sub(f"://{MASK}@", text)
    text = _SECRET_QUERY.sub(rf"\1{MASK}", text)
    text = _AUTH_HEADER.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    text = _CURL_USER.sub(rf"\1{MASK}", text)
    text = _KEY_VALUE.sub(_masked_value, text)
    return _AWS_KEY_ID.sub(MASK, text)


def _masked_value(match: re.Match) -> str:
    value = match.group(2)
    quote = value[0] if value[0] in "'\"" else ""
    return f"{match.group(1)}{quote}{MASK}{quote}"


def redact_all(value: Any) -> Any:
    """``redact`` through dicts, lists and tuples (``result.json``'s summary)."""
    if isinstance(value, dict):
        return {redact(k): redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return redact(value)


class RedactingStream:
    """A text stream that redacts what is written to it, a line at a time (a secret written in two pieces
    is still whole when it is redacted); everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        self._pending += text
        end = max(self._pending.rfind("\n"), self._pending.rfind("\r"))
        if end >= 0:
            self.stream.write(redact(self._pending[:end + 1]))
            self._pending = self._pending[end + 1:]
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.stream.write(redact(self._pending))
            self._pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class RedactingFilter(logging.Filter):
    """Redacts a log record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = redact(record.exc_text) if record.exc_text else record.exc_text
        return True


_flush_at_exit = False


def _flush_streams() -> None:
    """At exit: what is still pending (a last line without its newline)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, RedactingStream):
            try:
                stream.flush()
            except (OSError, ValueError):  # already closed
                pass


def install() -> None:
    """Redact this process's console from now on: ``sys.stdout`` / ``sys.stderr`` (prints, tracebacks,
    warnings, and the log handlers created later) and the handlers that already exist (Ray's own).
    Idempotent; called by the CLI first thing and by every Ray worker before the job's code runs."""
    global _flush_at_exit
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    if not _flush_at_exit:
        _flush_at_exit = True
        atexit.register(_flush_streams)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
