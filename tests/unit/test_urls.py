"""A step URL's user-info is hidden wherever a URL is shown outside the step's definition."""

from __future__ import annotations

import logging
import sys

import pytest

from aetr.api.server import RedactCallbackTokens
from aetr.cli import render
from aetr.domain.urls import redact_userinfo


@pytest.mark.parametrize(("text", "shown"), [
    ("https://user:secret@host/x", "https://***@host/x"),
    ("POST http://user:secret@127.0.0.1:8080/x?aetr=1 failed: refused",
     "POST http://***@127.0.0.1:8080/x?aetr=1 failed: refused"),
    ("http://token@host", "http://***@host"),  # a lone user name can be the secret too
    ("http://a@b:s@cr@t@host:1/p", "http://***@host:1/p"),  # the host follows the last '@', as urllib reads it
    ("a redirect to 'https://u:p@elsewhere/' and to http://v:q@[::1]/", "a redirect to 'https://***@elsewhere/' "
                                                                        "and to http://***@[::1]/"),
])
def test_the_user_info_of_every_url_in_a_text_is_hidden(text: str, shown: str) -> None:
    assert redact_userinfo(text) == shown


@pytest.mark.parametrize("text", ["http://host/path@v2?to=a@b#x@y", "mail ops@example.com", "no url at all",
                                  "http://host:8080/"])
def test_text_without_user_info_is_left_alone(text: str) -> None:
    assert redact_userinfo(text) == text


def test_a_log_line_of_aetr_serve_does_not_show_a_password() -> None:
    try:
        raise OSError("cannot reach http://user:secret@10.0.0.1/x")
    except OSError:
        record = logging.LogRecord("aetr", logging.ERROR, __file__, 1, "calling %s failed", ("http://u:secret@h/",),
                                   exc_info=sys.exc_info())
    assert RedactCallbackTokens().filter(record)
    line = logging.Formatter().format(record)
    assert "secret" not in line and "http://***@h/" in line and "http://***@10.0.0.1/x" in line


def test_the_cli_draws_a_step_tree_without_the_password_of_its_urls() -> None:
    tree = {"name": "p", "kind": "sequential", "version": 1, "children": [{"mapper": None, "step": {
        "name": "a", "kind": "api", "version": 1, "url": "https://user:secret@host/a", "method": "POST"}}]}
    label = str(render.step_tree(tree).children[0].label)
    assert "secret" not in label and "https://***@host/a" in label
