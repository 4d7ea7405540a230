"""Run user JavaScript mappers and reducers safely, in hardened V8 isolates (mini-racer)."""

from aetr.sandbox.errors import ScriptError, ScriptErrorKind
from aetr.sandbox.limits import SandboxLimits
from aetr.sandbox.pool import Sandbox

__all__ = ["Sandbox", "SandboxLimits", "ScriptError", "ScriptErrorKind"]
