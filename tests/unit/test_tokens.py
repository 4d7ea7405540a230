"""Callback tokens name one attempt of one node and cannot be forged."""

from __future__ import annotations

import base64
import uuid

from hypothesis import given
from hypothesis import strategies as st

from aetr.engine.tokens import CANONICAL_TOKEN, TOKEN_BYTES, Attempt, TokenSigner, redact


@given(node=st.uuids(), attempt=st.integers(0, 2**31))
def test_a_signed_token_names_its_attempt(node: uuid.UUID, attempt: int) -> None:
    signer = TokenSigner("k")
    assert signer.verify(signer.sign(str(node), attempt)) == Attempt(str(node), attempt)


def test_a_token_made_before_an_upgrade_is_still_accepted() -> None:
    # Made by the release before the signer was sped up: a step called before an upgrade calls back after it.
    token = "AZLxpHw-fSqbEE5fanuMnQAAAAd-acor0t-381clrpT1144y"
    signer = TokenSigner("an earlier release")
    assert signer.verify(token) == Attempt("0192f1a4-7c3e-7d2a-9b10-4e5f6a7b8c9d", 7)
    assert signer.sign("0192f1a4-7c3e-7d2a-9b10-4e5f6a7b8c9d", 7) == token


@given(node=st.uuids(), upper=st.booleans())
def test_any_spelling_of_a_node_id_signs_as_its_uuid(node: uuid.UUID, upper: bool) -> None:
    signer = TokenSigner("k")
    for spelling in (str(node).upper() if upper else str(node), node.hex, f"{{{node}}}"):
        assert signer.verify(signer.sign(spelling, 3)) == Attempt(str(node), 3)


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


def a_token_with_both_url_safe_characters(signer: TokenSigner) -> str:
    """A genuine token holding '-' and '_' (the characters standard base64 spells '+' and '/')."""
    node = uuid.UUID(int=0x0123456789ABCDEF0123456789ABCDEF)
    token = next(t for t in (signer.sign(str(node), attempt) for attempt in range(10_000)) if "-" in t and "_" in t)
    assert len(token) == 48
    return token


def test_only_the_canonical_spelling_of_a_token_is_accepted() -> None:
    signer = TokenSigner("k")
    token = a_token_with_both_url_safe_characters(signer)
    assert signer.verify(token) is not None
    dash, underscore = token.index("-"), token.index("_")
    letter = next(i for i, c in enumerate(token) if c.isalpha())
    variants = {
        "'!' inserted": token[:10] + "!" + token[10:],
        "'!' appended": token + "!",
        "'-' written '+'": token[:dash] + "+" + token[dash + 1:],
        "'_' written '/'": token[:underscore] + "/" + token[underscore + 1:],
        "'=' appended": token + "=",
        "'==' appended": token + "==",
        "space inserted": token[:20] + " " + token[20:],
        "newline appended": token + "\n",
        "leading space": " " + token,
        "tab inserted": token[:30] + "\t" + token[30:],
        "an extra character": token + "A",
        "a character dropped": token[:-1],
        "a letter's case changed": token[:letter] + token[letter].swapcase() + token[letter + 1:],
        "percent-encoded dash": token[:dash] + "%2D" + token[dash + 1:],
        "a non-ASCII character": token[:5] + "é" + token[6:],
    }
    for what, variant in variants.items():
        assert variant != token
        assert signer.verify(variant) is None, what


def test_every_canonical_text_decodes_to_bytes_that_encode_back_to_it() -> None:
    # 36 bytes are exactly 48 base64 characters: no padding and no spare bits, hence one spelling per token.
    signer = TokenSigner("k")
    token = a_token_with_both_url_safe_characters(signer)
    assert CANONICAL_TOKEN.fullmatch(token)
    raw = base64.urlsafe_b64decode(token)
    assert len(raw) == TOKEN_BYTES and base64.urlsafe_b64encode(raw).decode() == token


def test_redaction_blanks_a_token_and_any_misspelling_of_one() -> None:
    token = a_token_with_both_url_safe_characters(TokenSigner("k"))
    dash = token.index("-")
    for spelled in (token, token[:10] + "!" + token[10:], token[:dash] + "+" + token[dash + 1:], token + "==",
                    token[:10] + "%21" + token[10:]):
        line = redact(f'"POST /api/v1/callbacks/{spelled}/fail HTTP/1.1" 404')
        assert line == '"POST /api/v1/callbacks/<token>/fail HTTP/1.1" 404'
        encoded = redact(f"http://svc/x?aetr=http%3A%2F%2Fh%3A9999%2Fapi%2Fv1%2Fcallbacks%2F{spelled}&b=1")
        assert encoded == "http://svc/x?aetr=http%3A%2F%2Fh%3A9999%2Fapi%2Fv1%2Fcallbacks%2F<token>&b=1"
