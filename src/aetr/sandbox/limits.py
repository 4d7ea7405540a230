"""The time and memory a single script call may use."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
MIN_MEMORY_LIMIT_BYTES = 16 * MIB  # a hardened isolate needs about 1 MiB before any script runs


@dataclass(frozen=True)
class SandboxLimits:
    """The time and memory a single script call may use."""

    time_limit_s: float = 1.0  # wall clock per call
    memory_limit_bytes: int = 64 * MIB

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, got {self.time_limit_s!r} (AETR_SANDBOX_TIME_LIMIT_S)")
        if self.memory_limit_bytes < MIN_MEMORY_LIMIT_BYTES:
            raise ValueError(
                f"memory_limit_bytes must be at least {MIN_MEMORY_LIMIT_BYTES // MIB} MiB, "
                f"got {self.memory_limit_bytes} bytes (AETR_SANDBOX_MEMORY_MB)"
            )

    def timeout_message(self) -> str:
        """Say which limit a script broke and how to raise it."""
        return f"script exceeded the time limit of {self.time_limit_s} s (raise it with AETR_SANDBOX_TIME_LIMIT_S)"

    def memory_message(self) -> str:
        """Say which limit a script broke and how to raise it."""
        return (
            f"script exceeded the memory limit of {self.memory_limit_bytes / MIB:g} MiB "
            "(raise it with AETR_SANDBOX_MEMORY_MB)"
        )
