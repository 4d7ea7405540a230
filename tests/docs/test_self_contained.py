"""The repository stands on its own: no tracked file points to a document outside it.

A reader of a clone has only the clone: a link to a sibling folder, a section number of a document that is not
in it, or "as the issue says" sends them nowhere. Binary files are skipped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Each pattern, and what it catches, in the words the test reports.
OUTSIDE: dict[str, re.Pattern[str]] = {
    "a path into a folder beside the repository": re.compile(r"\.\./shared\b|\bshared/spec\b"),
    "a section of a specification that is not in the repository": re.compile(
        r"\b(?:spec(?:ification)?|contract)\s*§", re.IGNORECASE),
    "a reference to an issue, which a clone does not carry": re.compile(
        r"\bthe\s+(?:[\w-]+\s+)?issue(?:'s)?\b(?!\s+(?:of|with|is|was|here))|\bissue\s+#?\d+", re.IGNORECASE),
    "a reference to the internal contract": re.compile(r"\bthe contract\b", re.IGNORECASE),
}
# A document named in the text must be one of the repository's own files.
DOCUMENT = re.compile(r"[\w./-]*\b(?:DESIGN|API)\.md\b")


def tracked_text_files() -> list[Path]:
    """Every file git tracks that reads as UTF-8 text."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (images)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def outside_references(text: str, tracked: set[str]) -> list[str]:
    """What in `text` points outside the repository, each as `line N: what: the words`."""
    found = []
    for what, pattern in OUTSIDE.items():
        for match in pattern.finditer(text):
            found.append((match.start(), what, match.group(0)))
    for match in DOCUMENT.finditer(text):
        name = match.group(0).lstrip("./")
        if not any(path == name or path.endswith("/" + name) for path in tracked):
            found.append((match.start(), "a document that is not in the repository", match.group(0)))
    return [f"line {text.count(chr(10), 0, at) + 1}: {what}: {words!r}" for at, what, words in sorted(found)]


def test_the_patterns_catch_what_they_are_for() -> None:
    tracked = {"docs/api.md"}
    # Spelled in pieces, so that this file does not itself show what it looks for to a plain grep.
    caught = ["see ../" + "shared/spec/API.md", "as in spec " + "§6", "Contract §3", "as the performance issue says",
              "the issue's sizes", "issue 15", "where the contract is silent", "DESIGN.md", "docs/API.md"]
    for text in caught:
        assert outside_references(text, tracked), text
    allowed = ["see docs/api.md", "RFC 9110 §13.1.1", "SQLAlchemy issues a statement", "(§ Runs)",
               "the `/api/v1` routes", "the issue of memory is"]
    for text in allowed:
        assert not outside_references(text, tracked), text


def test_no_tracked_file_refers_to_anything_outside_the_repository() -> None:
    files = tracked_text_files()
    tracked = {str(p.relative_to(ROOT)) for p in files}
    problems = []
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this file names the patterns it looks for
        problems += [f"{path.relative_to(ROOT)}, {found}"
                     for found in outside_references(path.read_text(encoding="utf-8"), tracked)]
    assert not problems, ("these refer to something outside the repository; say what is meant in the project's own "
                          "words, or point to a file in the repository:\n" + "\n".join(problems))
