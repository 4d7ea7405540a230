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
        # The key's HMAC state, made once and copied for each token: half the cost of hmac.digest, which looks
        # the hash up in OpenSSL and keys it again every time (a token is made for every call and checked for
        # every callback).
        self._keyed = hmac.new(hashlib.sha256(b"aetr-callback:" + secret.encode()).digest(), digestmod=hashlib.sha256)

    def sign(self, node_id: str, attempt: int) -> str:
        """The token for this attempt of this node."""
        body = _uuid_bytes(node_id) + attempt.to_bytes(4, "big")
        mac = self._mac(body)
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()

    def _mac(self, body: bytes) -> bytes:
        keyed = self._keyed.copy()
        keyed.update(body)
        return keyed.digest()[:MAC_BYTES]

    def verify(self, token: str) -> Attempt | None:
        """The attempt a token names, or None when it is not one we signed (compared in constant time)."""
        if CANONICAL_TOKEN.fullmatch(token) is None:
            return None
        raw = base64.urlsafe_b64decode(token)
        body, mac = raw[:20], raw[20:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        h = body[:16].hex()
        return Attempt(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", int.from_bytes(body[16:], "big"))


def _uuid_bytes(node_id: str) -> bytes:
    """A node id's 16 bytes: the hex of its canonical spelling read directly (a fifth of uuid.UUID's cost), any
    other spelling as uuid.UUID reads it."""
    if len(node_id) == 36 and node_id[8] == node_id[13] == node_id[18] == node_id[23] == "-":
        return bytes.fromhex(f"{node_id[:8]}{node_id[9:13]}{node_id[14:18]}{node_id[19:23]}{node_id[24:]}")
    return uuid.UUID(node_id).bytes


# Whatever follows `callbacks/` in a path (`/callbacks/<token>/fail`), or `callbacks%2F` in a step URL's
# percent-encoded `aetr=` parameter, up to the next separator: a canonical token, and any misspelling of one
# (a character inserted, '+' for '-', padding), which would otherwise show most of a real token.
CALLBACK_TOKEN = re.compile(r"(callbacks(?:/|%2F))[^/?#&\s\"'<>\\]+", re.IGNORECASE)
REDACTED = "<token>"


def redact(text: str) -> str:
    """`text` with every callback token blanked out."""
    return CALLBACK_TOKEN.sub(rf"\g<1>{REDACTED}", text)
