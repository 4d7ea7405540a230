"""Suite-wide checks."""

from __future__ import annotations

import os

import pytest

_pg_passed = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count PostgreSQL tests that really ran and passed."""
    global _pg_passed
    if report.when == "call" and report.passed and "postgres" in report.keywords:
        _pg_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With AETR_REQUIRE_POSTGRES=1 a run in which no PostgreSQL test passed fails, even if nothing else did."""
    selected_pg = any("postgres" in item.keywords for item in session.items)
    if os.environ.get("AETR_REQUIRE_POSTGRES") == "1" and selected_pg and _pg_passed == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nAETR_REQUIRE_POSTGRES=1 but no PostgreSQL test passed: failing the run")
