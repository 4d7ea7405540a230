"""Measure the sandbox's per-call overhead: a trivial mapper on a 1 KB input (target: p50 <= 0.5 ms).

Run with `.venv/bin/python benchmarks/sandbox_bench.py`; it prints percentiles and asserts nothing.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import orjson

from aetr.sandbox import Sandbox

MAPPER = "(input, ctx) => ({ sku: input.id, count: input.items.length, index: ctx.index })"
WARMUP_CALLS = 500
MEASURED_CALLS = 5000


def one_kilobyte_input() -> dict[str, object]:
    """An order-like JSON object of about 1 KB."""
    items = [{"sku": f"SKU-{i:04d}", "qty": i % 5 + 1, "price": round(i * 1.37, 2)} for i in range(24)]
    return {"id": "order-0001", "customer": {"id": "c-42", "tier": "gold"}, "items": items}


def report(label: str, seconds: list[float]) -> None:
    """Print the percentiles of `seconds`, in milliseconds."""
    ordered = sorted(seconds)
    p50, p90, p99 = (ordered[int(len(ordered) * q)] * 1000 for q in (0.5, 0.9, 0.99))
    mean = statistics.fmean(ordered) * 1000
    print(f"{label:<10} p50 {p50:.3f} ms   p90 {p90:.3f} ms   p99 {p99:.3f} ms   mean {mean:.3f} ms")


def bench_call(sandbox: Sandbox, args: list[object]) -> list[float]:
    """Time blocking calls from one thread."""
    for _ in range(WARMUP_CALLS):
        sandbox.call(MAPPER, args)
    timings = []
    for _ in range(MEASURED_CALLS):
        start = time.perf_counter()
        sandbox.call(MAPPER, args)
        timings.append(time.perf_counter() - start)
    return timings


async def bench_acall(sandbox: Sandbox, args: list[object]) -> list[float]:
    """Time awaited calls from one coroutine (adds the hop to the sandbox's threads)."""
    for _ in range(WARMUP_CALLS):
        await sandbox.acall(MAPPER, args)
    timings = []
    for _ in range(MEASURED_CALLS):
        start = time.perf_counter()
        await sandbox.acall(MAPPER, args)
        timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    """Run the benchmark and print the results."""
    data = one_kilobyte_input()
    args: list[object] = [data, {"run": {"id": "r-1", "input": data}, "step": {"name": "map"}, "index": 0}]
    print(f"input: {len(orjson.dumps(data))} bytes of JSON; mapper: {MAPPER}")
    with Sandbox(pool_size=1) as sandbox:
        start = time.perf_counter()
        sandbox.call(MAPPER, args)
        print(f"first call (starts a worker process and its isolate): {(time.perf_counter() - start) * 1000:.0f} ms")
        report("call()", bench_call(sandbox, args))
        report("acall()", asyncio.run(bench_acall(sandbox, args)))


if __name__ == "__main__":
    main()
