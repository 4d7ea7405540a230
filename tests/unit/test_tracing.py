"""When the OTEL_* variables turn tracing on, and the run span context's stored form."""

from __future__ import annotations

import logging
import sys

import pytest

from aetr.engine import tracing


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "aetr"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
])
def test_tracing_is_on_only_when_the_variables_ask_for_traces(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled_by(environ) is on


def test_configure_installs_a_tracer_the_variables_ask_for_and_nothing_otherwise() -> None:
    assert tracing.configure({}) is False and tracing.TRACER is None
    try:
        assert tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is True
        assert tracing.TRACER is not None
    finally:
        tracing.uninstall()
    assert tracing.TRACER is None


def test_without_the_packages_tracing_stays_off_and_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace.export", None)  # importing it raises ImportError
    with caplog.at_level(logging.WARNING, "aetr.tracing"):
        assert tracing.configure({"OTEL_TRACES_EXPORTER": "otlp"}) is False
    assert tracing.TRACER is None and "pip install 'aetr[otel]'" in caplog.text


def test_a_run_context_reads_back_as_written_and_garbage_as_none() -> None:
    run = tracing.RunTrace(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 0, 1)
    assert run.encode() == "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0000000000000000-01"
    assert tracing.RunTrace.decode(run.encode()) == run
    assert tracing.RunTrace.decode("not-a-context") is None


def test_an_attempts_span_id_is_the_same_everywhere_and_differs_by_attempt() -> None:
    assert tracing.attempt_span_id("n-1", 1) == tracing.attempt_span_id("n-1", 1)
    assert tracing.attempt_span_id("n-1", 1) != tracing.attempt_span_id("n-1", 2)
    assert 0 < tracing.attempt_span_id("n-1", 1) < 2**64
