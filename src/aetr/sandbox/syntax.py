"""Where a script that does not parse goes wrong, in the lines and columns its author wrote.

V8 parses a script inside the function the sandbox wraps it in, so a script that ends too early (an unclosed
`{`) is reported at the wrapper's closing characters: a token its author never wrote, on a line past the
end. Such a report is replaced by the bracket, string or comment the script left open, found by a scan of
the source that knows JavaScript's strings, template literals and comments (not regular expression
literals: they are rare in mappers, and only matter here for a script that V8 already refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["SyntaxReport", "located", "unclosed"]

_HEAD: Final = re.compile(r"[^\n]*?:(\d+): ([^\n]*)")  # "<script>:<line>: SyntaxError: ..."
PAIRS: Final = {"(": ")", "[": "]", "{": "}"}
NAMES: Final = {"(": "parenthesis", "[": "bracket", "{": "brace", "'": "string", '"': "string",
                "`": "template literal", "/*": "comment"}


@dataclass(frozen=True, slots=True)
class SyntaxReport:
    """A syntax error as its author sees it: the message, and its line and column in their source."""

    message: str
    line: int | None = None
    column: int | None = None


def _caret_column(rest: list[str]) -> int | None:
    """The column V8 points at: its report's source line is followed by a line of carets under the token."""
    if len(rest) >= 2 and (carets := rest[1].strip()) and set(carets) == {"^"}:
        return rest[1].index("^") + 1
    return None


def unclosed(source: str) -> tuple[str, int, int] | None:
    """(what, line, column) of the first closing bracket that closes nothing (what: "stray }"), else of the
    innermost bracket, string, template literal or comment `source` leaves open at its end; None when it is
    balanced."""
    stack: list[tuple[str, int, int]] = []  # brackets and template literals open, and where
    line, column, i = 1, 1, 0
    mode = ""  # "", or the quote, template or comment being read
    opened = (1, 1)

    def advance(n: int = 1) -> None:
        nonlocal i, line, column
        for _ in range(n):
            if i < len(source) and source[i] == "\n":
                line, column = line + 1, 1
            else:
                column += 1
            i += 1

    while i < len(source):
        c, two = source[i], source[i:i + 2]
        if mode in ("'", '"'):
            if c == "\\":
                advance(2)
                continue
            if c == mode or c == "\n":
                mode = ""
            advance()
        elif mode == "`":
            if c == "\\":
                advance(2)
                continue
            if c == "`":
                mode = ""
                stack.pop()
            elif two == "${":
                stack.append(("${", line, column))
                mode = ""
                advance(2)
                continue
            advance()
        elif mode == "//":
            if c == "\n":
                mode = ""
            advance()
        elif mode == "/*":
            if two == "*/":
                mode = ""
                advance(2)
                continue
            advance()
        elif two in ("//", "/*"):
            mode, opened = two, (line, column)
            advance(2)
        elif c in ("'", '"'):
            mode, opened = c, (line, column)
            advance()
        elif c == "`":
            mode = "`"
            stack.append(("`", line, column))
            advance()
        elif c in PAIRS:
            stack.append((c, line, column))
            advance()
        elif c in PAIRS.values():
            if c == "}" and stack and stack[-1][0] == "${":
                stack.pop()
                mode = "`"  # back inside the template literal
            elif stack and PAIRS.get(stack[-1][0]) == c:
                stack.pop()
            else:
                return f"stray {c}", line, column
            advance()
        else:
            advance()
    if mode in ("'", '"', "/*"):
        return NAMES[mode], *opened
    if stack:
        what, at_line, at_column = stack[-1]
        if what == "${":
            return "template literal placeholder", at_line, at_column
        return NAMES[what], at_line, at_column
    return None


def _end(source: str) -> tuple[int, int]:
    """The line and column just after the last character of `source` that is not blank."""
    lines = source.rstrip().split("\n")
    return len(lines), len(lines[-1]) + 1


def located(report: str, source: str, line_offset: int) -> SyntaxReport:
    """A SyntaxError as V8 reports it for the wrapped `source` (`<script>:<line>: SyntaxError: ...`, the line,
    a caret under the column), in the lines and columns of `source` itself."""
    head, *rest = report.split("\n")
    found = _HEAD.match(head)
    if found is None:
        return SyntaxReport(report.strip().split("\n", 1)[0])
    message, line = found[2], int(found[1]) - line_offset
    lines = source.split("\n")
    if 1 <= line <= len(lines):
        column = _caret_column(rest)
        if column is None or column <= len(lines[line - 1]) + 1:
            return SyntaxReport(message, line, column)
    # Past the author's last line: the script ended before it was complete.
    open_at = unclosed(source)
    end_line, end_column = _end(source)
    if open_at is None:
        return SyntaxReport("SyntaxError: the script ends too early: something is missing after its last "
                            "character", end_line, end_column)
    what, at_line, at_column = open_at
    if what.startswith("stray "):
        return SyntaxReport(f"SyntaxError: the '{what[-1]}' on line {at_line}, column {at_column} closes nothing "
                            "that is open", at_line, at_column)
    return SyntaxReport(f"SyntaxError: the script ends before the {what} opened on line {at_line}, column "
                        f"{at_column} is closed", at_line, at_column)
