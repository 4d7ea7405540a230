"""The sandbox worker process: hosts one hardened isolate and runs the requests its parent sends.

Started as `python -m aetr.sandbox.worker <time_limit_s> <memory_limit_bytes> [public-api]` by
`WorkerProcess`, never by hand (`public-api`: use only mini-racer's public API, as when its internals are
gone). Requests arrive on stdin and responses leave on stdout (see `protocol.py`); file descriptor 1 is
then pointed at stderr, so that neither V8 nor a stray print can corrupt a frame.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Final

from aetr.sandbox.errors import ScriptError
from aetr.sandbox.isolate import Isolate
from aetr.sandbox.limits import SandboxLimits
from aetr.sandbox.protocol import (
    OP_CALL,
    OP_CHECK,
    READY,
    REQUEST_HEADER,
    RESULT,
    SCRIPT_ERROR,
    WORKER_FAILURE,
    encode_response,
    read_exactly,
    write_all,
)

ORPHAN_CHECK_S: Final = 1.0  # seconds between checks that the parent process is still alive


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit the worker once its parent has gone, even in the middle of a runaway script."""
    while True:
        time.sleep(ORPHAN_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(1)


PUBLIC_API_ONLY: Final = "public-api"  # the optional third argument


def serve(requests: int, responses: int, limits: SandboxLimits, use_internals: bool = True) -> None:
    """Answer requests until the parent closes the request pipe."""
    isolate = Isolate(limits, use_internals=use_internals)
    write_all(responses, encode_response(READY, isolate.calls_through.encode()))
    while True:
        header = read_exactly(requests, REQUEST_HEADER.size)
        if header is None:
            break
        op, source_size, argument_size = REQUEST_HEADER.unpack(header)
        body = read_exactly(requests, source_size + argument_size)
        if body is None:
            break
        source = body[:source_size].decode(errors="surrogatepass")
        try:
            if op == OP_CALL:
                response = encode_response(
                    RESULT, isolate.call(source, body[source_size:].decode(errors="surrogatepass")).encode()
                )
            elif op == OP_CHECK:
                isolate.check(source)
                response = encode_response(RESULT, b"null")
            else:
                raise ValueError(f"unknown sandbox request {op!r}")
        except ScriptError as e:
            error = {"kind": e.kind, "message": e.message, "line": e.line, "column": e.column}
            response = encode_response(SCRIPT_ERROR, json.dumps(error).encode())
        write_all(responses, response)
        if isolate.exhausted:
            # The parent replaces a worker whose isolate went over its memory limit; leave at once.
            os._exit(0)
    isolate.close()


def main(argv: list[str]) -> None:
    """Run the worker with the limits given on the command line."""
    parent_pid = os.getppid()
    requests, responses = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="orphan-check", daemon=True).start()
    try:
        limits = SandboxLimits(time_limit_s=float(argv[0]), memory_limit_bytes=int(argv[1]))
        serve(requests, responses, limits, use_internals=PUBLIC_API_ONLY not in argv[2:])
    except BaseException:
        # Tell the parent why, then leave without running finalizers that could wait on V8.
        try:
            write_all(responses, encode_response(WORKER_FAILURE, traceback.format_exc().encode()))
        finally:
            os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
