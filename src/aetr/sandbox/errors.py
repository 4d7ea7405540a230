"""The error a user script's failure raises."""

from __future__ import annotations

from typing import Literal, TypeAlias

ScriptErrorKind: TypeAlias = Literal["threw", "timeout", "memory", "not_json", "syntax"]


class ScriptError(Exception):
    """A user script failed: it threw, broke a limit, or returned something that is not JSON."""

    message: str
    line: int | None
    column: int | None
    kind: ScriptErrorKind

    def __init__(self, message: str, *, kind: ScriptErrorKind, line: int | None = None,
                 column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.line = line
        self.column = column

    @property
    def where(self) -> str:
        """`line L, column C` (or `line L`) in the script's own source, or '' when not known."""
        if self.line is None:
            return ""
        return f"line {self.line}, column {self.column}" if self.column is not None else f"line {self.line}"

    def __repr__(self) -> str:
        return (f"ScriptError({self.message!r}, kind={self.kind!r}, line={self.line!r}"
                + (f", column={self.column!r})" if self.column is not None else ")"))

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments are not in self.args, so the default reduce would lose them.
        return (_rebuild, (self.message, self.kind, self.line, self.column))


def _rebuild(message: str, kind: ScriptErrorKind, line: int | None, column: int | None = None) -> ScriptError:
    """Recreate a ScriptError when unpickling."""
    return ScriptError(message, kind=kind, line=line, column=column)
