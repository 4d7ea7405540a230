"""Suite-wide checks."""

from __future__ import annotations

import os

import pytest

_pg_passed = 0
_pg_reported = 0  # reports of PostgreSQL tests, whatever their outcome: they were selected


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count PostgreSQL tests that really ran and passed (with pytest-xdist: on the controller, from every worker)."""
    global _pg_passed, _pg_reported
    if "postgres" in report.keywords:
        _pg_reported += 1
        if report.when == "call" and report.passed:
            _pg_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With AETR_REQUIRE_POSTGRES=1 a run in which no PostgreSQL test passed fails, even if nothing else did."""
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller judges the whole run
        return
    selected_pg = _pg_reported > 0 or any("postgres" in item.keywords for item in session.items)
    if os.environ.get("AETR_REQUIRE_POSTGRES") == "1" and selected_pg and _pg_passed == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nAETR_REQUIRE_POSTGRES=1 but no PostgreSQL test passed: failing the run")
