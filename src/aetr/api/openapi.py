"""The OpenAPI document the server serves, written to docs/openapi.json.

Regenerate the committed copy after changing a route or a schema: `python -m aetr.api.openapi`
(or `python -m aetr.api.openapi PATH`, `-` for standard output).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

from aetr.api.app import create_app
from aetr.config import Settings

# The repository's copy: src/aetr/api/openapi.py -> the repository's root -> docs/openapi.json.
DOCUMENT_PATH: Final = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    """The document /openapi.json serves (it does not depend on the settings)."""
    return create_app(Settings()).openapi()


def document_text(doc: dict[str, Any]) -> str:
    """The document as committed: keys sorted, indented by 2, ending with a newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write the document to the path given (docs/openapi.json by default; `-` for standard output)."""
    if len(argv) > 1 or (argv and argv[0].startswith("-") and argv[0] != "-"):
        print("usage: python -m aetr.api.openapi [PATH | -]", file=sys.stderr)
        return 2
    text = document_text(document())
    if argv == ["-"]:
        sys.stdout.write(text)
        return 0
    target = Path(argv[0]) if argv else DOCUMENT_PATH
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
