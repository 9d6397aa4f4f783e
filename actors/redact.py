"""Secrets in an agent's environment: which names are secret, and redacting their values from output.

A name is secret when one of its parts (split at `_`, `-`, `.`) is, or ends with, KEY, TOKEN,
SECRET, PASSWORD, PASSWD or CREDENTIALS (case-insensitive: OPENAI_API_KEY, GITHUB_TOKEN,
PGPASSWORD; not KEYBOARD_LAYOUT), or when `[security] secret_env` lists it. Their values never go
into an event (the CLI refuses them in a request) and are replaced by `***` in recorded output.

Only the standard library is imported here: the shim uses it.
"""

import re
from collections.abc import Iterable, Mapping

MASK = b"***"
SECRET_PLACEHOLDER = "***"  # a secret's value in a request: the spawner's own value is used
MIN_SECRET_LEN = 6  # shorter values would match ordinary text ("true", "1"); they are not redacted
_WORDS = ("KEY", "KEYS", "TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "CREDENTIALS")
_PARTS = re.compile(r"[_.\-]+")


def is_secret_name(name: str, extra: Iterable[str] = ()) -> bool:
    """True when an environment variable of this name holds a secret."""
    if name in extra:
        return True
    return any(part.endswith(_WORDS) for part in _PARTS.split(name.upper()) if part)


def secret_values(env: Mapping[str, str], extra: Iterable[str] = ()) -> list[str]:
    """The values worth redacting: those of secret names, long enough not to match ordinary text."""
    names = set(extra)
    return sorted(
        {value for name, value in env.items() if is_secret_name(name, names) and len(value) >= MIN_SECRET_LEN},
        key=len,
        reverse=True,
    )


class Redactor:
    """Replaces secret values in a byte stream by `***`, also when a value is split between reads.

    `feed` holds back the end of the data when it could be the start of a secret (at most the
    length of the longest secret, minus one), and releases it with the next read or `finish`.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        if not self.secrets:
            return data
        text = self.held + data
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        keep = self._partial_tail(text)
        self.held = text[len(text) - keep :] if keep else b""
        return text[: len(text) - keep]

    def finish(self) -> bytes:
        """What is held back, at the end of the stream (a partial secret is not a secret)."""
        rest, self.held = self.held, b""
        return rest

    def _partial_tail(self, text: bytes) -> int:
        """The length of the longest end of `text` that is the beginning of a secret."""
        longest = 0
        for secret in self.secrets:
            # The earliest match is the longest; only ends longer than the best so far are of interest.
            i = text.find(secret[:1], max(0, len(text) - len(secret) + 1))
            while i != -1 and len(text) - i > longest:
                if secret.startswith(text[i:]):
                    longest = len(text) - i
                    break
                i = text.find(secret[:1], i + 1)
        return longest
