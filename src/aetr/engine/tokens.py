"""Callback tokens: unguessable, signed, naming one attempt of one node."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

MAC_BYTES = 16  # 128-bit truncated HMAC-SHA256: unforgeable without the key, short enough for a URL
TOKEN_BYTES = 16 + 4 + MAC_BYTES  # node uuid, attempt, MAC: a multiple of 3, so base64 needs no padding
# The one spelling of a token: unpadded base64url, 48 characters with no spare bits, so each such text decodes
# to one token and every other text is refused. Python's decoder alone is lenient: it skips characters outside
# the alphabet and takes '+' and '/' for '-' and '_'.
CANONICAL_TOKEN = re.compile(f"[A-Za-z0-9_-]{{{TOKEN_BYTES // 3 * 4}}}")


@dataclass(frozen=True)
class Attempt:
    """What a genuine token stands for."""

    node_id: str
    attempt: int


class TokenSigner:
    """Makes and checks callback tokens with one secret key."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"aetr-callback:" + secret.encode()).digest()

    def sign(self, node_id: str, attempt: int) -> str:
        """The token for this attempt of this node."""
        body = uuid.UUID(node_id).bytes + attempt.to_bytes(4, "big")
        mac = self._mac(body)
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()

    def _mac(self, body: bytes) -> bytes:
        # hmac.digest: OpenSSL's one-shot HMAC, without building an HMAC object per call (every call and callback)
        return hmac.digest(self._key, body, "sha256")[:MAC_BYTES]

    def verify(self, token: str) -> Attempt | None:
        """The attempt a token names, or None when it is not one we signed (compared in constant time)."""
        if CANONICAL_TOKEN.fullmatch(token) is None:
            return None
        raw = base64.urlsafe_b64decode(token)
        body, mac = raw[:20], raw[20:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        return Attempt(str(uuid.UUID(bytes=body[:16])), int.from_bytes(body[16:], "big"))


# Whatever follows `callbacks/` in a path (`/callbacks/<token>/fail`), or `callbacks%2F` in a step URL's
# percent-encoded `aetr=` parameter, up to the next separator: a canonical token, and any misspelling of one
# (a character inserted, '+' for '-', padding), which would otherwise show most of a real token.
CALLBACK_TOKEN = re.compile(r"(callbacks(?:/|%2F))[^/?#&\s\"'<>\\]+", re.IGNORECASE)
REDACTED = "<token>"


def redact(text: str) -> str:
    """`text` with every callback token blanked out."""
    return CALLBACK_TOKEN.sub(rf"\g<1>{REDACTED}", text)
