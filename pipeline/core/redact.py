"""Hide credentials in configs before they are logged or recorded.

A value is replaced by :data:`REDACTED` when its dotted key looks like a credential
(Spark's own ``spark.redaction.regex`` words — ``secret``, ``password``, ``token``,
``access.key`` — plus ``credential``, ``passphrase``, ``private/api/account/session key``),
e.g. ``spark.conf.spark.hadoop.fs.s3a.secret.key`` or ``etl.input.options.password``.
Plain ``key`` is not a credential word (``etl.key`` names the split column). In any string,
the password of a URI's user info is hidden too: ``s3a://user:pw@bucket/x`` becomes
``s3a://user:***@bucket/x``.

Spark-free and pure, so it runs wherever a config is logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["REDACTED", "is_sensitive", "redact", "redact_text"]

REDACTED: Final = "***"
_SENSITIVE: Final = re.compile(
    r"(?i:secret|passw(or)?d|pwd|passphrase|credential|"
    r"(access|private|api|account|session|signing|encryption)[._-]?key|"
    r"(?<![a-z])token(?![a-z]))"  # auth_token, token — not tokenizer or max_tokens
    r"|Token(?![a-z])"  # accessToken, sasToken
)
# scheme://user:password@host — the password is everything up to the last '@' of the netloc.
_USERINFO: Final = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^/\s:@]*):(?P<pw>[^/\s]+)@")


def is_sensitive(key: str) -> bool:
    """True when the (dotted) key names a credential."""
    return _SENSITIVE.search(key) is not None


def redact_text(text: str) -> str:
    """``text`` with the passwords of URIs' user info replaced."""
    return _USERINFO.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)


def redact(data: Any, prefix: str = "") -> Any:
    """A copy of ``data`` (plain config data) with credential values replaced.

    Mappings are walked with their dotted key (``prefix`` is the key of ``data`` itself);
    a sensitive key's whole value is replaced, whatever its type; other strings keep
    everything but URI passwords.
    """
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out[str(k)] = REDACTED if is_sensitive(key) and v is not None else redact(v, key)
        return out
    if isinstance(data, list | tuple):
        return [redact(v, prefix) for v in data]
    if isinstance(data, str):
        return redact_text(data)
    return data
