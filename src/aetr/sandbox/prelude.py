"""The JavaScript that hardens a fresh V8 isolate and returns the runner AETR calls into.

Evaluated once per isolate, it

1. removes every global that reaches memory outside the V8 heap or work that outlives a call
   (ArrayBuffer and typed arrays, SharedArrayBuffer, Atomics, WebAssembly, FinalizationRegistry,
   WeakRef, mini-racer's setTimeout), RegExp's legacy static properties (`RegExp.$1`, `RegExp.input`,
   ...: the last match of whichever script ran before), and code generation from strings (`eval`,
   `Function` and its generator and async variants), whose compiled code V8 keeps beyond the call;
2. turns the data properties that scripts commonly assign on their own objects (`toString`,
   `constructor`, an error's `name` and `message`, ...) into accessors, so that freezing the prototypes
   they inherit from does not make those assignments fail (the "override mistake");
3. deep-freezes the global object and every intrinsic reachable from it or from syntax
   (generator, async and iterator prototypes), so no script can leave state behind for another one;
4. returns the runner, a function that lives only in this closure and in the host's handle: no global
   names it, so no script can call it, read its compiled scripts or replace it.

User sources are compiled with the `Function` constructor, never spliced into a top-level script: V8
parses the body on its own, so a source cannot close the wrapper early and declare globals. Each call
runs the compiled factory again, so top-level `let`s and closures of a script start fresh every call.

The host calls the runner with one string as `this`: an operation letter, the script's id, `:`, then the
operation's text (`c`: compile the source that follows, as a JSON string, since mini-racer passes strings as
UTF-8, which cannot carry a lone surrogate; `r`: run on the JSON array of arguments that follows; `k`:
check that it evaluates to a function; `f`: forget it). Results travel as one string: `R` + the JSON text
of the result, or `E` + a JSON `{"kind", "message", "line"}` describing a script error.
"""

from __future__ import annotations

from typing import Final

SCRIPT_NAME: Final = "mapper.js"

# Globals whose removal the sandbox relies on; checked again by the tests.
REMOVED_GLOBALS: Final = (
    "ArrayBuffer",
    "SharedArrayBuffer",
    "DataView",
    "Atomics",
    "WebAssembly",
    "FinalizationRegistry",
    "WeakRef",
    "setTimeout",
    "clearTimeout",
    "__timer_manager",
)

PRELUDE_JS: Final = r"""
(function (config) {
  "use strict";
  const g = globalThis;
  const { defineProperty, freeze, getOwnPropertyDescriptor, getPrototypeOf } = Object;
  const { apply, ownKeys } = Reflect;
  const FunctionCtor = Function;
  const ErrorCtor = Error;
  const EvalErrorCtor = EvalError;
  const PromiseCtor = Promise;
  const parse = JSON.parse;
  const stringify = JSON.stringify;
  const SOURCE_URL = "\n//# sourceURL=" + config.scriptName;
  const LINE_RE = new RegExp(config.scriptName.replace(/[.]/g, "\\.") + ":(\\d+):\\d+");

  // 1. Typed arrays and buffers live outside the V8 heap, so the memory limit cannot see them.
  const TypedArray = getPrototypeOf(Int8Array);
  for (const name of ownKeys(g)) {
    const d = getOwnPropertyDescriptor(g, name);
    if (typeof d.value === "function" && getPrototypeOf(d.value) === TypedArray) delete g[name];
  }
  for (const name of config.removedGlobals) {
    const d = getOwnPropertyDescriptor(g, name);
    if (d === undefined) continue;
    // mini-racer declares its timer helpers with `var`, which cannot be deleted.
    if (d.configurable) delete g[name];
    else g[name] = undefined;
  }
  // RegExp's legacy statics are the realm's last match: any later script could read another's input there.
  for (const name of ownKeys(RegExp)) {
    if (name !== "length" && name !== "name" && name !== "prototype" && name !== "escape" &&
        name !== Symbol.species) {
      delete RegExp[name];
    }
  }
  // V8 keeps code compiled from strings after the call that made it (only a low-memory GC drops it), so a
  // script could fill the heap for the next ones. The runner keeps the real Function constructor.
  function refuser(name, prototype) {
    const refuse = function () {
      throw new EvalErrorCtor(name + "() is not available in the sandbox: code generation from strings is " +
        "disabled; write the code in the script itself");
    };
    defineProperty(refuse, "name", { value: name });
    if (prototype !== undefined) {
      defineProperty(refuse, "prototype", { value: prototype });
      defineProperty(prototype, "constructor", { value: refuse });
    }
    return refuse;
  }
  defineProperty(g, "Function", { value: refuser("Function", FunctionCtor.prototype) });
  refuser("GeneratorFunction", getPrototypeOf(function* () {}));
  refuser("AsyncFunction", getPrototypeOf(async function () {}));
  refuser("AsyncGeneratorFunction", getPrototypeOf(async function* () {}));
  defineProperty(g, "eval", { value: refuser("eval", undefined) });

  // 2. Keep `obj.toString = ...` and `this.name = ...` working once the prototypes are frozen.
  function tameOverride(proto, key) {
    const d = getOwnPropertyDescriptor(proto, key);
    if (d === undefined || !("value" in d) || !d.writable) return;
    const value = d.value;
    defineProperty(proto, key, {
      get() { return value; },
      set(v) {
        if (this === proto) {
          throw new TypeError("Cannot assign to read only property '" + String(key) + "' of a built-in prototype");
        }
        defineProperty(this, key, { value: v, writable: true, enumerable: true, configurable: true });
      },
      enumerable: d.enumerable,
      configurable: false,
    });
  }
  for (const key of ["constructor", "toString", "toLocaleString", "valueOf", "hasOwnProperty",
                     "isPrototypeOf", "propertyIsEnumerable"]) {
    tameOverride(Object.prototype, key);
  }
  for (const name of ["Error", "AggregateError", "EvalError", "RangeError", "ReferenceError", "SyntaxError",
                      "TypeError", "URIError", "SuppressedError"]) {
    if (typeof g[name] !== "function") continue;
    for (const key of ["name", "message", "toString"]) tameOverride(g[name].prototype, key);
  }

  // 4. The runner and the compiled scripts, reachable from this closure only.
  const registry = new Map();
  class NotCallable {
    constructor(what) { this.what = what; }
  }
  let lineOffset = 0;

  function scriptError(kind, message, line) {
    return "E" + stringify({ kind, message, line: line === undefined ? null : line });
  }

  function describeThrown(e) {
    if (e instanceof NotCallable) {
      return scriptError("syntax", "the script evaluates to " + e.what + ", not a function: write an " +
        "expression such as `(input, ctx) => ({ ... })` or declare `function apply(input, ctx) { ... }`");
    }
    try {
      if (e instanceof ErrorCtor) {
        const m = LINE_RE.exec(String(e.stack));
        const line = m === null ? null : Number(m[1]) - lineOffset;
        return scriptError("threw", String(e), line !== null && line >= 1 ? line : null);
      }
      if (typeof e === "string") return scriptError("threw", "Uncaught " + e);
      const text = stringify(e);
      return scriptError("threw", "Uncaught " + (text === undefined ? String(e) : text));
    } catch (_) {
      return scriptError("threw", "the script threw a value that cannot be displayed");
    }
  }

  function compile(id, script) {
    // `x => x;` is a statement; as an expression it must lose its trailing semicolons.
    let end = script.trimEnd().length;
    while (end > 0 && script.charCodeAt(end - 1) === 59) end -= 1;
    const expression = script.slice(0, end);
    let factory;
    try {
      factory = new FunctionCtor('"use strict"; return (\n' + expression + "\n);" + SOURCE_URL);
    } catch (_) {
      // Not an expression, so a script declaring `apply`. Parse it alone first: its SyntaxError is then
      // about the user's text only, and it propagates so that mini-racer's message carries the line.
      new FunctionCtor('"use strict";\n' + script + SOURCE_URL);
      factory = new FunctionCtor('"use strict";\n' + script +
        '\n;return typeof apply === "function" ? apply : undefined;' + SOURCE_URL);
    }
    registry.set(id, factory);
    return "R0";
  }

  function instantiate(id) {
    const fn = registry.get(id)();
    if (typeof fn !== "function") {
      throw new NotCallable(fn === undefined ? "undefined (and declares no `apply` function)"
        : fn === null ? "null" : "a value of type " + typeof fn);
    }
    return fn;
  }

  function check(id) {
    try {
      instantiate(id);
    } catch (e) {
      return describeThrown(e);
    }
    return "Rnull";
  }

  function notJson(result) {
    if (result === undefined) return "undefined";
    if (typeof result === "bigint") return "a BigInt";
    if (typeof result === "symbol") return "a symbol";
    if (typeof result === "function") return "a function";
    if (result instanceof PromiseCtor) {
      return "a Promise (scripts must be synchronous: no async, no await, no import(): modules cannot load here)";
    }
    return null;
  }

  function run(id, argsJson) {
    let result;
    try {
      result = apply(instantiate(id), undefined, parse(argsJson));
    } catch (e) {
      return describeThrown(e);
    }
    const what = notJson(result);
    if (what !== null) {
      return scriptError("not_json", "the script returned " + what + ", which is not JSON: return null, " +
        "a boolean, a number, a string, an array or an object");
    }
    let text;
    try {
      text = stringify(result);
    } catch (e) {
      return scriptError("not_json", "the script's result cannot be turned into JSON: " + String(e));
    }
    if (text === undefined) return scriptError("not_json", "the script's result turns into nothing in JSON");
    if (text.length > config.maxResultChars) return scriptError("memory", String(text.length));
    return "R" + text;
  }

  function runner() {
    const request = this;
    const colon = request.indexOf(":");
    const id = request.slice(1, colon);
    const text = request.slice(colon + 1);
    switch (request[0]) {
      case "r": return run(id, text);
      case "c": return compile(id, parse(text));
      case "k": return check(id);
      case "f": registry.delete(id); return "R0";
      default: throw new ErrorCtor("unknown sandbox operation " + request[0]);
    }
  }

  // Line numbers in stack traces count the lines the Function constructor adds; measure them.
  compile("probe", "() => { throw new Error() }");
  lineOffset = Number(LINE_RE.exec(String((() => {
    try { registry.get("probe")()(); } catch (e) { return e.stack; }
  })()))[1]) - 1;
  registry.delete("probe");

  // 3. Deep-freeze everything a script can reach, including intrinsics reachable only through syntax.
  const roots = [
    g,
    function* () {}, (function* () {})(),
    async function () {}, async function* () {}, (async function* () {})(),
    [][Symbol.iterator](), new Map()[Symbol.iterator](), new Set()[Symbol.iterator](), ""[Symbol.iterator](),
    /x/[Symbol.matchAll](""),
  ];
  if (typeof Iterator === "function") {
    roots.push([].values().map((x) => x), Iterator.from({ next() { return { done: true }; } }));
  }
  if (typeof Intl === "object" && typeof Intl.Segmenter === "function") {
    const segments = new Intl.Segmenter().segment("");
    roots.push(segments, segments[Symbol.iterator]());
  }
  const seen = new WeakSet();
  const stack = roots;
  while (stack.length > 0) {
    const o = stack.pop();
    if ((typeof o !== "object" && typeof o !== "function") || o === null || seen.has(o)) continue;
    seen.add(o);
    freeze(o);
    stack.push(getPrototypeOf(o));
    for (const key of ownKeys(o)) {
      const d = getOwnPropertyDescriptor(o, key);
      if (d === undefined) continue;
      if ("value" in d) stack.push(d.value);
      else stack.push(d.get, d.set);
    }
  }
  return [runner, lineOffset];
})
"""
