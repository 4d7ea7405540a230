"""Schedules' time arithmetic: next due times in a zone (daylight-saving changes included) and catch-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aetr.domain.schedules import (
    Schedule,
    StoredSchedule,
    cron_problem,
    firing,
    latest_due,
    next_after,
    next_run,
    run_key,
    zone,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_spring_forward_in_paris_runs_a_skipped_local_time_when_the_gap_ends() -> None:
    # 2026-03-29 02:00 Paris does not exist (clocks jump to 03:00): 02:30 that day runs at 03:00 local.
    times = [utc(2026, 3, 28, 2)]
    for _ in range(3):
        times.append(next_after("30 2 * * *", "Europe/Paris", times[-1]))
    assert times[1:] == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]


def test_fall_back_in_paris_runs_a_repeated_local_time_twice() -> None:
    # 2026-10-25 03:00 CEST becomes 02:00 CET: 02:30 local happens twice, an hour apart, and runs each time.
    first = next_after("30 2 * * *", "Europe/Paris", utc(2026, 10, 24, 12))
    second = next_after("30 2 * * *", "Europe/Paris", first)
    third = next_after("30 2 * * *", "Europe/Paris", second)
    assert (first, second, third) == (utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30), utc(2026, 10, 26, 1, 30))


def test_times_are_read_in_the_schedules_zone() -> None:
    assert next_after("0 9 * * *", "America/New_York", utc(2026, 7, 1)) == utc(2026, 7, 1, 13)
    assert next_after("0 9 * * *", "UTC", utc(2026, 7, 1)) == utc(2026, 7, 1, 9)


def test_a_due_time_counts_as_passed_at_that_very_instant() -> None:
    assert latest_due("* * * * *", "UTC", utc(2026, 1, 1, 0, 5)) == utc(2026, 1, 1, 0, 5)
    assert latest_due("* * * * *", "UTC", utc(2026, 1, 1, 0, 5, 59)) == utc(2026, 1, 1, 0, 5)


def test_a_schedule_missed_for_hours_starts_one_catch_up_run_for_its_latest_missed_time() -> None:
    fire = firing("0 * * * *", "UTC", utc(2026, 5, 1, 10), utc(2026, 5, 1, 13, 42))
    assert fire is not None
    assert (fire.due_at, fire.following) == (utc(2026, 5, 1, 13), utc(2026, 5, 1, 14))


def test_a_schedule_looked_at_when_due_starts_that_time_and_moves_to_the_next() -> None:
    fire = firing("*/5 * * * *", "UTC", utc(2026, 5, 1, 10, 5), utc(2026, 5, 1, 10, 5, 0, 300_000))
    assert fire is not None
    assert (fire.due_at, fire.following) == (utc(2026, 5, 1, 10, 5), utc(2026, 5, 1, 10, 10))


def test_nothing_fires_before_the_due_time_or_while_paused() -> None:
    assert firing("* * * * *", "UTC", utc(2026, 5, 1, 10, 6), utc(2026, 5, 1, 10, 5, 59)) is None
    assert firing("* * * * *", "UTC", None, utc(2026, 5, 1, 10, 5)) is None


@pytest.mark.parametrize(("expression", "says"), [
    ("* * * *", "has 4 fields; write five"),
    ("0 * * * * *", "has 6 fields; write five"),
    ("61 * * * *", "is not a valid cron expression"),
    ("a b c d e", "is not a valid cron expression"),
    ("0 0 30 2 *", "never comes"),
    ("", "has 0 fields"),
])
def test_cron_expressions_are_checked_with_a_reason(expression: str, says: str) -> None:
    problem = cron_problem(expression)
    assert problem is not None and says in problem


def test_valid_cron_expressions_pass() -> None:
    for expression in ("* * * * *", "30 2 * * 1-5", "0 0 L * *", "*/15 9-17 * * mon-fri"):
        assert cron_problem(expression) is None


def test_an_unknown_time_zone_is_refused_with_an_example() -> None:
    with pytest.raises(ValueError, match=r"not a known IANA time zone.*Europe/Paris"):
        zone("Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="not a known IANA time zone"):
        zone("../../etc/passwd")
    with pytest.raises(ValueError, match="not a known IANA time zone"):
        zone("localtime")  # a file in the zone database, not a zone name


NOW = utc(2026, 5, 1, 10, 0, 30)


def stored(schedule: Schedule, next_run_at: datetime | None) -> StoredSchedule:
    return StoredSchedule("id", schedule, next_run_at, NOW, NOW)


def test_a_paused_schedule_has_no_next_time_and_resuming_does_not_back_fill() -> None:
    running = Schedule("s", "step", "* * * * *")
    paused = Schedule("s", "step", "* * * * *", enabled=False)
    assert next_run(paused, stored(running, utc(2026, 5, 1, 9)), NOW) is None
    # Paused since 09:00: resumed at 10:00:30, it is next due at 10:01, not at the times it missed.
    assert next_run(running, stored(paused, None), NOW) == utc(2026, 5, 1, 10, 1)


def test_a_replacement_on_the_same_cron_keeps_a_due_time_not_yet_started() -> None:
    old = Schedule("s", "step", "* * * * *")
    assert next_run(Schedule("s", "other", "* * * * *", input=3), stored(old, utc(2026, 5, 1, 10)), NOW) == \
        utc(2026, 5, 1, 10)
    assert next_run(Schedule("s", "step", "0 * * * *"), stored(old, utc(2026, 5, 1, 10)), NOW) == \
        utc(2026, 5, 1, 11)


def test_run_keys_name_the_schedule_and_the_due_time_to_the_second() -> None:
    due = datetime(2026, 5, 1, 12, 0, tzinfo=zone("Europe/Paris"))
    assert run_key("abc", due) == "schedule:abc:2026-05-01T10:00:00Z"
    assert run_key("abc", due) != run_key("abc", due + timedelta(minutes=1))


def test_the_test_clock_setting_is_checked_and_runs_faster_from_its_epoch() -> None:
    from aetr.config import ConfigError, Settings
    from aetr.engine.schedules import warped_clock

    with pytest.raises(ConfigError, match="AETR_TEST_SCHEDULE_CLOCK='soon': write EPOCH\\*RATE"):
        Settings.from_env({"AETR_TEST_SCHEDULE_CLOCK": "soon"})
    with pytest.raises(ConfigError, match="AETR_SCHEDULE_TICK_S='0' must be a finite number greater than 0"):
        Settings.from_env({"AETR_SCHEDULE_TICK_S": "0"})
    settings = Settings.from_env({"AETR_TEST_SCHEDULE_CLOCK": "1000*60", "AETR_SCHEDULE_TICK_S": "0.1"})
    assert (settings.test_schedule_clock, settings.schedule_tick_s) == ("1000*60", 0.1)
    real = datetime.now(UTC)
    warped = warped_clock("1000*60")()
    assert abs((warped.timestamp() - 1000) - (real.timestamp() - 1000) * 60) < 60
