"""Callback tokens: unguessable, signed, naming one attempt of one node."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

MAC_BYTES = 16  # 128-bit truncated HMAC-SHA256: unforgeable without the key, short enough for a URL


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
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            return None
        if len(raw) != 20 + MAC_BYTES:
            return None
        body, mac = raw[:20], raw[20:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        return Attempt(str(uuid.UUID(bytes=body[:16])), int.from_bytes(body[16:], "big"))


# A callback token in a path (`/callbacks/<token>`) or percent-encoded in a step URL's `aetr=` parameter.
CALLBACK_TOKEN = re.compile(r"(callbacks(?:/|%2F))[A-Za-z0-9_-]+=*", re.IGNORECASE)
REDACTED = "<token>"


def redact(text: str) -> str:
    """`text` with every callback token blanked out."""
    return CALLBACK_TOKEN.sub(rf"\g<1>{REDACTED}", text)
