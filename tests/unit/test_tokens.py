"""Callback tokens name one attempt of one node and cannot be forged."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from aetr.engine.tokens import Attempt, TokenSigner


@given(node=st.uuids(), attempt=st.integers(0, 2**31))
def test_a_signed_token_names_its_attempt(node: uuid.UUID, attempt: int) -> None:
    signer = TokenSigner("k")
    assert signer.verify(signer.sign(str(node), attempt)) == Attempt(str(node), attempt)


@given(flip=st.integers(0, 47))
def test_any_altered_character_is_rejected(flip: int) -> None:
    signer = TokenSigner("k")
    token = signer.sign(str(uuid.uuid4()), 1)
    i = flip % len(token)
    altered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
    assert signer.verify(altered) is None


def test_a_token_from_another_key_or_garbage_is_rejected() -> None:
    token = TokenSigner("one").sign(str(uuid.uuid4()), 1)
    assert TokenSigner("two").verify(token) is None
    for junk in ("", "abc", "!!!!", "A" * 48, token + "A"):
        assert TokenSigner("one").verify(junk) is None
