"""Step URLs as shown outside the step's own definition: without the user-info (`user:password@`) part."""

from __future__ import annotations

import re
from typing import Final

# The user-info of every `scheme://user:password@host` in a text: everything from `//` to the last `@` before
# the path, query or fragment starts (as urllib and yarl read the authority: the host follows the last `@`).
_USERINFO: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
HIDDEN: Final = "***"


def redact_userinfo(text: str) -> str:
    """`text` with the user-info of every URL in it replaced by `***` (`https://***@host/`)."""
    if "@" not in text:  # the common case: no URL with user-info, nothing to search
        return text
    return _USERINFO.sub(rf"\g<1>{HIDDEN}@", text)
