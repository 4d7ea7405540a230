"""One hardened V8 isolate that compiles and runs user scripts; it lives inside a sandbox worker process.

Isolation model (see `prelude.py` for the JavaScript side):

- The isolate has a hard heap limit, and the globals that allocate outside the heap (ArrayBuffer, typed
  arrays, WebAssembly, ...) are removed, so the limit sees every allocation a script makes.
- The global object and all intrinsics are deep-frozen and scripts run in strict mode, so a script can
  neither define globals nor patch prototypes for the next script; each call re-runs the script's
  factory, so even one script's own top-level state starts fresh every call.
- The runner and the compiled scripts are reachable only through this object's handle on the runner
  function: no global names them, so a script can neither run, read nor replace another's code.
- What the isolate keeps of the scripts it compiled is bounded in number and in size (`COMPILED_PER_ISOLATE`,
  `compiled_chars`), so that many large sources cannot fill the heap that later scripts need.
- A call is complete only once the microtasks (promise callbacks) it queued have run: mini-racer runs them
  between tasks, outside any evaluation, so `Promise.resolve().then(() => { for (;;); })` would otherwise
  return at once and then hang the isolate for the next caller. `_fence` waits for them.
- Nothing here enforces the time limit: the parent process kills the worker when a call overruns,
  which also stops V8 builtins that ignore TerminateExecution.

Speed: mini-racer's public `eval(timeout_sec=...)` and function calls hop through an asyncio loop thread
(~0.6 ms per call here). This class submits calls of the runner to the context directly and reads
mini-racer's in-order result queue, which needs the internals of the mini-racer release pyproject.toml pins.
`__init__` looks for them and, when they are missing or changed, calls the runner through the public API
instead: slower, same behaviour. `calls_through` says which.
"""

from __future__ import annotations

import itertools
import json
import queue
from collections import OrderedDict
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Final, cast, get_args

import orjson
from py_mini_racer import JSEvalException, JSOOMException, MiniRacer

from aetr.sandbox.errors import ScriptError, ScriptErrorKind
from aetr.sandbox.limits import MIB, SandboxLimits
from aetr.sandbox.prelude import PRELUDE_JS, REMOVED_GLOBALS, SCRIPT_NAME
from aetr.sandbox.syntax import located

if TYPE_CHECKING:
    from py_mini_racer import JSArray, JSFunction, PythonJSConvertedTypes

COMPILED_PER_ISOLATE: Final = 256  # most recently used sources kept compiled in one isolate
COMPILED_SHARE: Final = 16  # their sources may take at most 1/16 of the memory limit, counted in characters
_IN_ORDER_CALLBACK_ID: Final = 0  # mini-racer queues the results for this callback id in submission order
_KINDS: Final = frozenset(get_args(ScriptErrorKind))


def _js_string(text: str) -> str:
    """Quote `text` as a JSON string."""
    try:
        return orjson.dumps(text).decode()
    except TypeError:
        return json.dumps(text)  # a lone surrogate, which orjson refuses and json escapes


def _source_line(line: object, source: str) -> int | None:
    """Return `line` if it is a line of `source`, else None."""
    if isinstance(line, int) and 1 <= line <= source.count("\n") + 1:
        return line
    return None


class _Internals:
    """mini-racer's private context members the fast path calls the runner with; AttributeError if one is missing."""

    def __init__(self, racer: MiniRacer) -> None:
        ctx: Any = racer._ctx
        self.dll: Any = ctx._dll
        self.raw_ctx: object = ctx._ctx
        self.results: queue.Queue[Any] = ctx._non_cancelable_mr_task_results_queue
        self.to_handle: Any = ctx._python_to_value_handle
        self.to_python: Any = ctx._value_handle_to_python
        self.dll.mr_call_function  # noqa: B018 -- looked up now, so a missing entry point is found at start
        self.runner_handle: Any = None
        self.no_args_handle: Any = None

    def bind(self, racer: MiniRacer, runner: JSFunction) -> None:
        """Make the handles held for every call: the runner, and the empty argument list it is called with."""
        self.runner_handle = self.to_handle(runner)
        self.no_args_handle = self.to_handle(racer.eval("[]"))

    def submit(self, request: str) -> None:
        """Queue a call of the runner with `request` as `this`; its result goes to the in-order queue."""
        request_handle = self.to_handle(request)
        self.dll.mr_call_function(self.raw_ctx, self.runner_handle.raw, request_handle.raw,
                                  self.no_args_handle.raw, _IN_ORDER_CALLBACK_ID)

    def result(self) -> PythonJSConvertedTypes:
        """The result of the call submitted last (raises the JSEvalException the runner let through)."""
        return cast("PythonJSConvertedTypes", self.to_python(self.results.get_nowait()))


class Isolate:
    """One hardened V8 isolate that compiles and runs user scripts, used by one thread at a time."""

    def __init__(self, limits: SandboxLimits, use_internals: bool = True) -> None:
        self._limits = limits
        self._compiled: OrderedDict[str, str] = OrderedDict()  # source -> id of its compiled factory
        self._compiled_chars = 0
        self.compiled_chars = limits.memory_limit_bytes // COMPILED_SHARE
        self._ids = itertools.count()
        self.exhausted = False  # the heap went over the limit: the isolate must not run anything else
        self._racer = MiniRacer()
        try:
            release = f"mini-racer {version('mini-racer')}"
            self._internals: _Internals | None = None
            self.calls_through = f"{release}'s public API (asked to)"  # how calls reach V8, for the log
            if use_internals:
                try:
                    self._internals = _Internals(self._racer)
                    self.calls_through = f"{release}'s internals"
                except AttributeError as e:
                    self.calls_through = (f"{release}'s public API, slower: its internals are missing or changed "
                                          f"({e}); pyproject.toml pins the release they are known in")
            self._racer.set_hard_memory_limit(limits.memory_limit_bytes)
            config = {
                "scriptName": SCRIPT_NAME,
                "removedGlobals": REMOVED_GLOBALS,
                "maxResultChars": limits.memory_limit_bytes,
            }
            prepared = cast("JSArray", self._racer.eval(f"{PRELUDE_JS}({orjson.dumps(config).decode()})"))
            self._runner = cast("JSFunction", prepared[0])
            self._line_offset = int(cast("int", prepared[1]))
            if self._internals is not None:
                self._internals.bind(self._racer, self._runner)
        except BaseException:
            self._racer.close()
            raise

    @property
    def uses_internals(self) -> bool:
        """Whether calls take the fast path through mini-racer's internals."""
        return self._internals is not None

    def call(self, source: str, args_json: str) -> str:
        """Run `source` on the JSON array `args_json` and return its result as JSON text."""
        return self._unwrap(self._invoke(f"r{self._compilation(source)}:{args_json}"), source)

    def check(self, source: str) -> None:
        """Raise ScriptError unless `source` compiles and evaluates to a function."""
        self._unwrap(self._invoke(f"k{self._compilation(source)}:"), source)

    def close(self) -> None:
        """Free the isolate."""
        self._racer.close()

    def _invoke(self, request: str) -> PythonJSConvertedTypes | JSEvalException:
        """Call the runner with `request` as `this`; return its answer, or the exception it let through."""
        if self.exhausted:
            raise RuntimeError("this isolate went over its memory limit; start a new one")
        outcome: PythonJSConvertedTypes | JSEvalException
        if self._internals is None:
            try:
                outcome = self._runner(this=cast("Any", request))
            except JSEvalException as e:
                outcome = e
            self._fence()
        else:
            self._internals.submit(request)
            self._fence()
            try:
                outcome = self._internals.result()
            except JSEvalException as e:
                outcome = e
        if isinstance(outcome, JSOOMException) or self._racer.was_hard_memory_limit_reached():
            self.exhausted = True
            raise ScriptError(self._limits.memory_message(), kind="memory") from None
        return outcome

    def _unwrap(self, outcome: PythonJSConvertedTypes | JSEvalException, source: str) -> str:
        """Return the JSON text of a runner's answer, or raise the ScriptError it describes."""
        if isinstance(outcome, JSEvalException):
            raise RuntimeError(f"the sandbox runner failed: {outcome}")
        if not isinstance(outcome, str) or not outcome:
            raise RuntimeError(f"the sandbox runner returned {outcome!r}; expected a tagged string")
        if outcome[0] == "R":
            return outcome[1:]
        raise self._script_error(outcome[1:], source)

    def _fence(self) -> None:
        """Wait until the isolate has finished the submitted call and the microtasks it queued."""
        # An identity-hash lookup is a synchronous task on the isolate's thread: it runs only after the
        # call and the microtask checkpoint that follows it, and it runs no JavaScript itself.
        hash(self._runner)

    def _compilation(self, source: str) -> str:
        """Return the id of `source`'s compiled factory, compiling it first if needed."""
        script_id = self._compiled.get(source)
        if script_id is not None:
            self._compiled.move_to_end(source)
            return script_id
        while self._compiled and (len(self._compiled) >= COMPILED_PER_ISOLATE
                                  or self._compiled_chars + len(source) > self.compiled_chars):
            evicted, evicted_id = self._compiled.popitem(last=False)
            self._compiled_chars -= len(evicted)
            self._unwrap(self._invoke(f"f{evicted_id}:"), evicted)
        script_id = str(next(self._ids))
        # As a JSON string: mini-racer passes strings as UTF-8, which has no lone surrogates; JSON escapes them.
        outcome = self._invoke(f"c{script_id}:{_js_string(source)}")
        if isinstance(outcome, JSEvalException):
            # The runner catches everything a script throws, so this is the Function constructor's.
            raise self._compile_error(outcome, source) from None
        self._unwrap(outcome, source)
        self._compiled[source] = script_id
        self._compiled_chars += len(source)
        return script_id

    def _compile_error(self, error: JSEvalException, source: str) -> ScriptError:
        """Turn mini-racer's report of a compile failure into a ScriptError with the user's line."""
        report = located(str(error), source, self._line_offset)
        return ScriptError(report.message, kind="syntax", line=report.line, column=report.column)

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
