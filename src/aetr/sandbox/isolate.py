"""One hardened V8 isolate that compiles and runs user scripts; it lives inside a sandbox worker process.

Isolation model (see `prelude.py` for the JavaScript side):

- The isolate has a hard heap limit, and the globals that allocate outside the heap (ArrayBuffer, typed
  arrays, WebAssembly, ...) are removed, so the limit sees every allocation a script makes.
- The global object and all intrinsics are deep-frozen and scripts run in strict mode, so a script can
  neither define globals nor patch prototypes for the next script; each call re-runs the script's
  factory, so even one script's own top-level state starts fresh every call.
- A call is complete only once the microtasks (promise callbacks) it queued have run: mini-racer runs them
  between tasks, outside any evaluation, so `Promise.resolve().then(() => { for (;;); })` would otherwise
  return at once and then hang the isolate for the next caller. `_fence` waits for them.
- Nothing here enforces the time limit: the parent process kills the worker when a call overruns,
  which also stops V8 builtins that ignore TerminateExecution.

Speed: mini-racer's public `eval(timeout_sec=...)` hops through an asyncio loop thread (~0.6 ms per call
here). This class submits evaluations to the context directly and reads mini-racer's in-order result
queue, which needs mini-racer 0.14 internals; `__init__` checks that they are there.
"""

from __future__ import annotations

import json
import queue
import re
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final, cast, get_args

import orjson
from py_mini_racer import JSEvalException, JSOOMException, MiniRacer

from aetr.sandbox.errors import ScriptError, ScriptErrorKind
from aetr.sandbox.limits import MIB, SandboxLimits
from aetr.sandbox.prelude import PRELUDE_JS, REMOVED_GLOBALS, SCRIPT_NAME

if TYPE_CHECKING:
    from py_mini_racer import JSObject, PythonJSConvertedTypes

COMPILED_PER_ISOLATE: Final = 256  # most recently used sources kept compiled in one isolate
_IN_ORDER_CALLBACK_ID: Final = 0  # mini-racer queues the results for this callback id in submission order
_LOCATED_MESSAGE = re.compile(r"[^\n]*?:(\d+): ([^\n]*)")  # "<script>:<line>: SyntaxError: ..."
_KINDS: Final = frozenset(get_args(ScriptErrorKind))


def _js_string(text: str) -> str:
    """Quote `text` as a JavaScript string literal (JSON strings are valid ones since ES2019)."""
    try:
        return orjson.dumps(text).decode()
    except TypeError:
        return json.dumps(text)  # a lone surrogate, which orjson refuses and json escapes


def _source_line(line: object, source: str) -> int | None:
    """Return `line` if it is a line of `source`, else None."""
    if isinstance(line, int) and 1 <= line <= source.count("\n") + 1:
        return line
    return None


class Isolate:
    """One hardened V8 isolate that compiles and runs user scripts, used by one thread at a time."""

    def __init__(self, limits: SandboxLimits) -> None:
        self._limits = limits
        self._compiled: OrderedDict[str, str] = OrderedDict()  # source -> id of its compiled factory
        self.exhausted = False  # the heap went over the limit: the isolate must not run anything else
        self._racer = MiniRacer()
        try:
            try:
                ctx: Any = self._racer._ctx
                self._dll: Any = ctx._dll
                self._raw_ctx: object = ctx._ctx
                self._results: queue.Queue[Any] = ctx._non_cancelable_mr_task_results_queue
                self._to_handle: Any = ctx._python_to_value_handle
                self._to_python: Any = ctx._value_handle_to_python
            except AttributeError as e:
                raise RuntimeError(
                    "this mini-racer version is not supported: the AETR sandbox relies on mini-racer 0.14 "
                    "internals; install mini-racer>=0.14.1,<0.15"
                ) from e
            self._racer.set_hard_memory_limit(limits.memory_limit_bytes)
            config = {
                "scriptName": SCRIPT_NAME,
                "removedGlobals": REMOVED_GLOBALS,
                "maxResultChars": limits.memory_limit_bytes,
            }
            self._line_offset = int(cast("int", self._racer.eval(f"{PRELUDE_JS}({orjson.dumps(config).decode()})")))
            self._runner = cast("JSObject", self._racer.eval("__aetr"))
        except BaseException:
            self._racer.close()
            raise

    def call(self, source: str, args_json: str) -> str:
        """Run `source` on the JSON array `args_json` and return its result as JSON text."""
        return self._evaluate(source, "run", _js_string(args_json))

    def check(self, source: str) -> None:
        """Raise ScriptError unless `source` compiles and evaluates to a function."""
        self._evaluate(source, "check", None)

    def close(self) -> None:
        """Free the isolate."""
        self._racer.close()

    def _evaluate(self, source: str, method: str, argument: str | None) -> str:
        """Compile `source` if needed, invoke the runner's `method` on it and return the JSON text."""
        if self.exhausted:
            raise RuntimeError("this isolate went over its memory limit; start a new one")
        prefix, script_id = self._compilation(source)
        call_args = f'"{script_id}"' if argument is None else f'"{script_id}",{argument}'
        handle = self._to_handle(f"{prefix}__aetr.{method}({call_args})")
        self._dll.mr_eval(self._raw_ctx, handle.raw, _IN_ORDER_CALLBACK_ID)
        self._fence()
        outcome: PythonJSConvertedTypes | JSEvalException
        try:
            outcome = self._to_python(self._results.get_nowait())
        except JSEvalException as e:
            outcome = e
        if isinstance(outcome, JSOOMException) or self._racer.was_hard_memory_limit_reached():
            self.exhausted = True
            raise ScriptError(self._limits.memory_message(), kind="memory") from None
        if isinstance(outcome, JSEvalException):
            # The runner catches everything a script throws, so this is the Function constructor's.
            raise self._compile_error(outcome, source) from None
        self._compiled[source] = script_id
        if not isinstance(outcome, str) or not outcome:
            raise RuntimeError(f"the sandbox runner returned {outcome!r}; expected a tagged string")
        if outcome[0] == "R":
            return outcome[1:]
        raise self._script_error(outcome[1:], source)

    def _fence(self) -> None:
        """Wait until the isolate has finished the submitted evaluation and the microtasks it queued."""
        # An identity-hash lookup is a synchronous task on the isolate's thread: it runs only after the
        # evaluation and the microtask checkpoint that follows it, and it runs no JavaScript itself.
        hash(self._runner)

    def _compilation(self, source: str) -> tuple[str, str]:
        """Return the code that compiles `source` (empty if already compiled) and its id."""
        script_id = self._compiled.get(source)
        if script_id is not None:
            self._compiled.move_to_end(source)
            return "", script_id
        # Random ids: a script calling `__aetr.run` cannot guess another script's id.
        script_id = secrets.token_hex(8)
        prefix = ""
        if len(self._compiled) >= COMPILED_PER_ISOLATE:
            _, evicted = self._compiled.popitem(last=False)
            prefix = f'__aetr.forget("{evicted}"),'
        # `x => x;` is a statement; as an expression it must lose its semicolon.
        expression = source.rstrip().rstrip(";")
        compile_code = f'__aetr.compile("{script_id}",{_js_string(expression)},{_js_string(source)}),'
        return prefix + compile_code, script_id

    def _compile_error(self, error: JSEvalException, source: str) -> ScriptError:
        """Turn mini-racer's report of a compile failure into a ScriptError with the user's line."""
        text = str(error)
        located = _LOCATED_MESSAGE.match(text)
        if located is None:
            return ScriptError(text.strip().split("\n", 1)[0], kind="syntax")
        line = _source_line(int(located[1]) - self._line_offset, source)
        return ScriptError(located[2], kind="syntax", line=line)

    def _script_error(self, payload: str, source: str) -> ScriptError:
        """Turn the runner's `{"kind", "message", "line"}` into a ScriptError."""
        described = json.loads(payload)  # not orjson: a message may hold an escaped lone surrogate
        kind = described["kind"]
        if kind not in _KINDS:
            raise RuntimeError(f"the sandbox runner reported an unknown error kind {kind!r}")
        message = str(described["message"])
        if kind == "memory":
            message = (
                f"script returned {int(message) / MIB:.1f} MiB of JSON, over the memory limit of "
                f"{self._limits.memory_limit_bytes / MIB:g} MiB (return less data, or raise the limit "
                "with AETR_SANDBOX_MEMORY_MB)"
            )
        return ScriptError(message, kind=cast("ScriptErrorKind", kind), line=_source_line(described["line"], source))
