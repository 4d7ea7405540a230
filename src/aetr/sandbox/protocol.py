"""The frames the sandbox and its worker processes exchange over the worker's stdin and stdout.

A request is `op, len(source), len(argument)` then the two UTF-8 texts; a response is `tag, len(payload)`
then the payload. One request is outstanding per worker at a time, so frames never interleave.
"""

from __future__ import annotations

import os
import struct
from typing import Final

OP_CALL: Final = b"C"  # argument: the JSON array of call arguments; answered with RESULT or SCRIPT_ERROR
OP_CHECK: Final = b"K"  # argument: empty; answered with RESULT (null) or SCRIPT_ERROR

READY: Final = b"Y"  # sent once, when the worker's isolate is ready; payload: how its calls reach V8, for the log
RESULT: Final = b"R"  # payload: the JSON text of the script's result
SCRIPT_ERROR: Final = b"E"  # payload: JSON {"kind", "message", "line"} of a ScriptError
WORKER_FAILURE: Final = b"X"  # payload: a traceback; the worker exits after sending it

REQUEST_HEADER: Final = struct.Struct("!cII")
RESPONSE_HEADER: Final = struct.Struct("!cI")


def encode_request(op: bytes, source: str, argument: str) -> bytes:
    """Frame a request to a worker."""
    # Lone surrogates are not UTF-8, but JSON and JavaScript strings may hold them: carry them through.
    source_bytes = source.encode(errors="surrogatepass")
    argument_bytes = argument.encode(errors="surrogatepass")
    return REQUEST_HEADER.pack(op, len(source_bytes), len(argument_bytes)) + source_bytes + argument_bytes


def encode_response(tag: bytes, payload: bytes) -> bytes:
    """Frame a worker's response."""
    return RESPONSE_HEADER.pack(tag, len(payload)) + payload


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however many writes the pipe needs."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exactly(fd: int, size: int) -> bytes | None:
    """Read `size` bytes from `fd`, blocking; None if it reaches end of file first."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)
