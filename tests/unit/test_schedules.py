"""Schedules: next-run computation (month ends, leap years, DST), is_due semantics, parsing,
validation messages and serialisation."""
from __future__ import annotations

import copy
import json
import pickle
import re
from datetime import datetime, timedelta, timezone

import pytest

from qctl import App
from qctl import schedules
from qctl.schedules import (MAX_CHECK_INTERVAL, BaseSchedule, crontab, from_dict, maybe_schedule,
                            schedstate, schedule, to_dict)

pytestmark = pytest.mark.timeout(60)

UTC = timezone.utc
LONDON = "Europe/London"
NEW_YORK = "America/New_York"


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def zone(name: str):
    """The zone, or skip the test on a system without that part of the zone database."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:
        pytest.skip(f"zone {name} is not installed")


def runs_between(sched: BaseSchedule, start: datetime, end: datetime) -> list[datetime]:
    """Every run in (start, end), by following next_run_after."""
    found = []
    when = sched.next_run_after(start)
    while when < end:
        found.append(when)
        when = sched.next_run_after(when)
    return found


class Clock:
    """A settable ``nowfun``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# -- next_run_after: the calendar ----------------------------------------------------------------

CALENDAR_CASES = [
    # (crontab kwargs, after, expected next run)
    ({}, utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 1)),
    ({}, utc(2026, 1, 1, 0, 0, 30), utc(2026, 1, 1, 0, 1)),
    ({"minute": "*/15"}, utc(2026, 5, 4, 10, 7), utc(2026, 5, 4, 10, 15)),
    ({"minute": "*/15"}, utc(2026, 5, 4, 10, 45), utc(2026, 5, 4, 11, 0)),
    ({"minute": "*/15"}, utc(2026, 5, 4, 23, 50), utc(2026, 5, 5, 0, 0)),
    # year boundary
    ({"minute": 0, "hour": 0, "day_of_month": 1, "month_of_year": 1},
     utc(2026, 6, 1), utc(2027, 1, 1)),
    ({"minute": 59, "hour": 23, "day_of_month": 31, "month_of_year": 12},
     utc(2026, 12, 31, 23, 59), utc(2027, 12, 31, 23, 59)),
    ({"minute": "*/10"}, utc(2026, 12, 31, 23, 55), utc(2027, 1, 1, 0, 0)),
    # month ends: the 31st skips 30-day months and February
    ({"minute": 0, "hour": 0, "day_of_month": 31}, utc(2026, 4, 1), utc(2026, 5, 31)),
    ({"minute": 0, "hour": 0, "day_of_month": 31}, utc(2026, 1, 31), utc(2026, 3, 31)),
    ({"minute": 0, "hour": 0, "day_of_month": 30}, utc(2026, 1, 30), utc(2026, 3, 30)),
    ({"minute": 0, "hour": 12, "day_of_month": "28-31", "month_of_year": 2},
     utc(2026, 2, 27), utc(2026, 2, 28, 12)),
    ({"minute": 0, "hour": 12, "day_of_month": "28-31", "month_of_year": 2},
     utc(2026, 2, 28, 12), utc(2027, 2, 28, 12)),
    # leap years: 29 February, including the century that is not a leap year
    ({"minute": 0, "hour": 0, "day_of_month": 29, "month_of_year": 2},
     utc(2026, 1, 1), utc(2028, 2, 29)),
    ({"minute": 0, "hour": 12, "day_of_month": "28-31", "month_of_year": 2},
     utc(2028, 2, 28, 12), utc(2028, 2, 29, 12)),
    ({"minute": 0, "hour": 0, "day_of_month": 29, "month_of_year": "feb"},
     utc(2096, 3, 1), utc(2104, 2, 29)),
    # day names and ranges (2026-01-01 is a Thursday)
    ({"minute": 0, "hour": 9, "day_of_week": "mon-fri"}, utc(2026, 1, 2, 9), utc(2026, 1, 5, 9)),
    ({"minute": 0, "hour": 9, "day_of_week": "MON-Fri"}, utc(2026, 1, 1, 8), utc(2026, 1, 1, 9)),
    ({"minute": 0, "hour": 9, "day_of_week": "sat,sun"}, utc(2026, 1, 1), utc(2026, 1, 3, 9)),
    ({"minute": 0, "hour": 9, "day_of_week": "fri-mon"}, utc(2026, 1, 5, 9), utc(2026, 1, 9, 9)),
    ({"minute": 0, "hour": 0, "day_of_week": 7}, utc(2026, 1, 1), utc(2026, 1, 4)),
    # day_of_month and day_of_week both restricted: either one matches (13th or a Friday)
    ({"minute": 0, "hour": 0, "day_of_month": 13, "day_of_week": "fri"},
     utc(2026, 1, 1), utc(2026, 1, 2)),
    ({"minute": 0, "hour": 0, "day_of_month": 13, "day_of_week": "fri"},
     utc(2026, 1, 9), utc(2026, 1, 13)),
    ({"minute": 0, "hour": 0, "day_of_month": 13, "day_of_week": "fri"},
     utc(2026, 1, 13), utc(2026, 1, 16)),
    # only one of them restricted: it decides alone
    ({"minute": 0, "hour": 0, "day_of_week": "mon"}, utc(2026, 1, 1), utc(2026, 1, 5)),
    ({"minute": 0, "hour": 0, "day_of_month": 13}, utc(2026, 1, 1), utc(2026, 1, 13)),
    # months by name
    ({"minute": 0, "hour": 0, "day_of_month": 1, "month_of_year": "jan,jul"},
     utc(2026, 2, 1), utc(2026, 7, 1)),
    ({"minute": 0, "hour": 0, "day_of_month": 1, "month_of_year": "Nov-Feb"},
     utc(2026, 3, 1), utc(2026, 11, 1)),
    # steps and lists
    ({"minute": "0-30/10"}, utc(2026, 1, 1, 5, 30), utc(2026, 1, 1, 6, 0)),
    ({"minute": "5/20"}, utc(2026, 1, 1, 5, 45), utc(2026, 1, 1, 6, 5)),
    ({"minute": "1,15", "hour": "*/6"}, utc(2026, 1, 1, 0, 15), utc(2026, 1, 1, 6, 1)),
    ({"minute": [1, 15], "hour": [3]}, utc(2026, 1, 1, 3, 2), utc(2026, 1, 1, 3, 15)),
    ({"minute": 0, "hour": "22-2"}, utc(2026, 1, 1, 2), utc(2026, 1, 1, 22)),
]


@pytest.mark.parametrize("fields,after,expected", CALENDAR_CASES)
def test_next_run_after_calendar(fields, after, expected):
    assert crontab(**fields).next_run_after(after) == expected


def test_next_run_after_is_strictly_after_and_returns_utc():
    every_hour = crontab(minute=0)
    nxt = every_hour.next_run_after(utc(2026, 1, 1, 5))
    assert nxt == utc(2026, 1, 1, 6)
    assert nxt.utcoffset() == timedelta(0)
    # an aware time in another zone is the same instant; a naive time is read as UTC
    plus_two = timezone(timedelta(hours=2))
    assert every_hour.next_run_after(datetime(2026, 1, 1, 7, 30, tzinfo=plus_two)) == nxt
    assert every_hour.next_run_after(datetime(2026, 1, 1, 5, 30)) == nxt


def test_search_far_ahead_visits_candidates_not_minutes(monkeypatch):
    """Finding 2104-02-29 from 2096 looks at matching days only, not every minute between."""
    leap_day = crontab(minute=0, hour=0, day_of_month=29, month_of_year=2)
    calls = []
    original = crontab._occurrences

    def counting(self, wall, zone_):
        calls.append(wall)
        return original(self, wall, zone_)

    monkeypatch.setattr(crontab, "_occurrences", counting)
    assert leap_day.next_run_after(utc(2096, 3, 1)) == utc(2104, 2, 29)
    assert len(calls) < 10


@pytest.mark.parametrize("expr,fields", [
    ("*/5 * * * *", {"minute": "*/5"}),
    ("30 9 1,15 * mon-fri", {"minute": 30, "hour": 9, "day_of_month": "1,15",
                             "day_of_week": "1-5"}),
    ("0 0 29 2 *", {"minute": 0, "hour": 0, "day_of_month": 29, "month_of_year": 2}),
    ("  0   4  * JAN sun ", {"minute": 0, "hour": 4, "month_of_year": 1, "day_of_week": 0}),
    ("@hourly", {"minute": 0}),
    ("@daily", {"minute": 0, "hour": 0}),
    ("@weekly", {"minute": 0, "hour": 0, "day_of_week": 0}),
    ("@monthly", {"minute": 0, "hour": 0, "day_of_month": 1}),
    ("@yearly", {"minute": 0, "hour": 0, "day_of_month": 1, "month_of_year": 1}),
])
def test_from_string_reads_fields_in_cron_order(expr, fields):
    assert crontab.from_string(expr) == crontab(**fields)


def test_from_string_dom_dow_or_rule():
    # 1st and 15th, plus every weekday: Saturday 2026-08-01 is the 1st
    sched = crontab.from_string("30 9 1,15 * mon-fri")
    assert sched.next_run_after(utc(2026, 7, 31, 10)) == utc(2026, 8, 1, 9, 30)
    assert sched.next_run_after(utc(2026, 8, 1, 10)) == utc(2026, 8, 3, 9, 30)


@pytest.mark.parametrize("expr,message", [
    ("* * *", "crontab expression needs 5 fields (minute hour day-of-month month "
              "day-of-week), got 3 in '* * *'"),
    ("* * * * * *", "got 6 in"),
    ("", "got 0 in"),
    ("61 * * * *", "crontab minute: 61 is out of range 0-59"),
])
def test_from_string_errors(expr, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        crontab.from_string(expr)


# -- fields ---------------------------------------------------------------------------------------

def test_fields_expand_to_frozensets():
    sched = crontab(minute="0-30/10", hour="*/6", day_of_week="mon-fri",
                    day_of_month="1,15", month_of_year="jan-mar")
    assert sched.minute == frozenset({0, 10, 20, 30})
    assert sched.hour == frozenset({0, 6, 12, 18})
    assert sched.day_of_week == frozenset({1, 2, 3, 4, 5})
    assert sched.day_of_month == frozenset({1, 15})
    assert sched.month_of_year == frozenset({1, 2, 3})
    assert all(isinstance(value, frozenset) for value in
               (sched.minute, sched.hour, sched.day_of_week, sched.day_of_month,
                sched.month_of_year))
    assert crontab().minute == frozenset(range(60))
    assert crontab().day_of_week == frozenset(range(7))
    assert crontab().day_of_month == frozenset(range(1, 32))


@pytest.mark.parametrize("value", ["sun", "SUN", "Sunday", "sunday", "0", "7", 0, 7, [7]])
def test_sunday_spellings(value):
    assert crontab(day_of_week=value).day_of_week == frozenset({0})


def test_day_and_month_names():
    assert crontab(day_of_week="mon,TUE,Wednesday,thu,fri,sat").day_of_week == \
        frozenset(range(1, 7))
    assert crontab(day_of_week="sat-sun").day_of_week == frozenset({6, 0})
    assert crontab(day_of_week="5-7").day_of_week == frozenset({5, 6, 0})
    assert crontab(day_of_week="0-7").day_of_week == frozenset(range(7))
    assert crontab(month_of_year="Jan,dec,JULY").month_of_year == frozenset({1, 7, 12})
    assert crontab(minute="50-10/5").minute == frozenset({50, 55, 0, 5, 10})


@pytest.mark.parametrize("fields,message", [
    ({"minute": "61"}, "crontab minute: 61 is out of range 0-59"),
    ({"minute": 61}, "crontab minute: 61 is out of range 0-59"),
    ({"minute": "1,75"}, "crontab minute: 75 is out of range 0-59"),
    ({"hour": "24"}, "crontab hour: 24 is out of range 0-23"),
    ({"hour": "20-25"}, "crontab hour: 25 is out of range 0-23"),
    ({"day_of_month": "0"}, "crontab day_of_month: 0 is out of range 1-31"),
    ({"day_of_month": "32"}, "crontab day_of_month: 32 is out of range 1-31"),
    ({"month_of_year": "13"}, "crontab month_of_year: 13 is out of range 1-12"),
    ({"day_of_week": "8"}, "crontab day_of_week: 8 is out of range 0-7"),
    ({"day_of_week": "funday"}, "crontab day_of_week: 'funday' is not a number or a day name"),
    ({"day_of_week": "mon-funday"},
     "crontab day_of_week: 'funday' is not a number or a day name"),
    ({"month_of_year": "smarch"},
     "crontab month_of_year: 'smarch' is not a number or a month name"),
    ({"minute": "mon"}, "crontab minute: 'mon' is not a number"),
    ({"day_of_month": "jan"}, "crontab day_of_month: 'jan' is not a number"),
    ({"minute": "*/0"}, "crontab minute: step must be at least 1 in '*/0'"),
    ({"hour": "0-12/0"}, "crontab hour: step must be at least 1 in '0-12/0'"),
    ({"minute": "*/x"}, "crontab minute: cannot parse '*/x'"),
    ({"minute": "*/"}, "crontab minute: cannot parse '*/'"),
    ({"hour": "1-"}, "crontab hour: cannot parse '1-'"),
    ({"hour": "-1"}, "crontab hour: cannot parse '-1'"),
    ({"hour": "1-2-3"}, "crontab hour: cannot parse '1-2-3'"),
    ({"minute": "1,,2"}, "crontab minute: cannot parse ''"),
    ({"minute": ""}, "crontab minute: empty field"),
    ({"minute": "  "}, "crontab minute: empty field"),
    ({"minute": []}, "crontab minute: empty field"),
    ({"minute": 1.5}, "crontab minute: expected a string, a number or a list of them, got 1.5"),
    ({"minute": None}, "crontab minute: expected a string"),
    ({"minute": True}, "crontab minute: expected a string"),
    ({"minute": [1, None]}, "crontab minute: None is not a number"),
    ({"day_of_month": 31, "month_of_year": 2},
     "crontab never matches: day_of_month 31 does not occur in month_of_year 2"),
    ({"day_of_month": "30,31", "month_of_year": "feb"},
     "crontab never matches: day_of_month 30,31 does not occur in month_of_year feb"),
    ({"day_of_month": 31, "month_of_year": "apr,jun,sep,nov"}, "crontab never matches"),
])
def test_invalid_fields_name_the_field_and_value(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        crontab(**fields)


def test_rare_but_possible_days_are_accepted():
    assert crontab(day_of_month=30, month_of_year="2,4").next_run_after(utc(2026, 1, 1)) == \
        utc(2026, 4, 30)
    # a weekday makes the 31st of February possible: any Monday in February
    assert crontab(minute=0, hour=0, day_of_month=31, month_of_year=2, day_of_week="mon") \
        .next_run_after(utc(2026, 1, 1)) == utc(2026, 2, 2)


# -- DST ------------------------------------------------------------------------------------------

def test_spring_forward_london_runs_missing_time_once_at_gap_end():
    zone(LONDON)
    # 2026-03-29: 01:00 GMT becomes 02:00 BST (01:00 UTC); 01:30 never happens
    sched = crontab(minute=30, hour=1, tz=LONDON)
    assert runs_between(sched, utc(2026, 3, 27, 12), utc(2026, 3, 31)) == [
        utc(2026, 3, 28, 1, 30),   # 01:30 GMT
        utc(2026, 3, 29, 1, 0),    # 02:00 BST, the end of the gap
        utc(2026, 3, 30, 0, 30),   # 01:30 BST
    ]


def test_spring_forward_several_times_in_gap_make_one_run():
    zone(LONDON)
    sched = crontab(minute="*/15", hour=1, tz=LONDON)
    assert [run for run in runs_between(sched, utc(2026, 3, 28, 12), utc(2026, 3, 30))] == \
        [utc(2026, 3, 29, 1, 0)]


def test_spring_forward_new_york_runs_missing_time_at_gap_end():
    zone(NEW_YORK)
    # 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00 UTC); 02:30 never happens
    sched = crontab(minute=30, hour=2, tz=NEW_YORK)
    assert runs_between(sched, utc(2026, 3, 7), utc(2026, 3, 10)) == [
        utc(2026, 3, 7, 7, 30),    # 02:30 EST
        utc(2026, 3, 8, 7, 0),     # 03:00 EDT, the end of the gap
        utc(2026, 3, 9, 6, 30),    # 02:30 EDT
    ]


def test_spring_forward_wildcard_hour_keeps_real_hourly_cadence():
    zone(LONDON)
    sched = crontab(minute=30, tz=LONDON)
    assert runs_between(sched, utc(2026, 3, 28, 23), utc(2026, 3, 29, 3)) == [
        utc(2026, 3, 28, 23, 30), utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 30),
        utc(2026, 3, 29, 2, 30)]


def test_fall_back_london_specific_hour_runs_once_at_first_occurrence():
    zone(LONDON)
    # 2026-10-25: 02:00 BST becomes 01:00 GMT (01:00 UTC); 01:30 happens at 00:30 and 01:30 UTC
    sched = crontab(minute=30, hour=1, tz=LONDON)
    assert runs_between(sched, utc(2026, 10, 24), utc(2026, 10, 27)) == [
        utc(2026, 10, 24, 0, 30),  # 01:30 BST
        utc(2026, 10, 25, 0, 30),  # 01:30 BST, the first of the two
        utc(2026, 10, 26, 1, 30),  # 01:30 GMT
    ]
    # asked from inside the repeated hour, the next run is the next day's
    assert sched.next_run_after(utc(2026, 10, 25, 1, 0)) == utc(2026, 10, 26, 1, 30)


def test_fall_back_new_york_specific_hour_runs_once_at_first_occurrence():
    zone(NEW_YORK)
    # 2026-11-01: 02:00 EDT becomes 01:00 EST (06:00 UTC)
    sched = crontab(minute=30, hour=1, tz=NEW_YORK)
    assert runs_between(sched, utc(2026, 10, 31), utc(2026, 11, 3)) == [
        utc(2026, 10, 31, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 5, 30),   # 01:30 EDT, the first of the two
        utc(2026, 11, 2, 6, 30),   # 01:30 EST
    ]
    on_the_hour = crontab(minute=0, hour=1, tz=NEW_YORK)
    assert on_the_hour.next_run_after(utc(2026, 11, 1, 5, 30)) == utc(2026, 11, 2, 6, 0)


@pytest.mark.parametrize("zone_name,start,expected", [
    (LONDON, utc(2026, 10, 24, 23), [utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 0, 30),
                                     utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 2, 30)]),
    (NEW_YORK, utc(2026, 11, 1, 4), [utc(2026, 11, 1, 4, 30), utc(2026, 11, 1, 5, 30),
                                     utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 7, 30)]),
])
def test_fall_back_wildcard_hour_runs_in_both_hours(zone_name, start, expected):
    zone(zone_name)
    sched = crontab(minute=30, tz=zone_name)
    assert runs_between(sched, start, start + timedelta(hours=4)) == expected


@pytest.mark.parametrize("zone_name,start", [
    (LONDON, utc(2026, 3, 28, 23)), (LONDON, utc(2026, 10, 24, 23)),
    (NEW_YORK, utc(2026, 3, 8, 5)), (NEW_YORK, utc(2026, 11, 1, 4)),
])
def test_every_minute_is_sixty_real_seconds_across_transitions(zone_name, start):
    zone(zone_name)
    runs = runs_between(crontab(tz=zone_name), start, start + timedelta(hours=4))
    assert len(runs) == 4 * 60 - 1
    assert {later - earlier for earlier, later in zip(runs, runs[1:])} == {timedelta(minutes=1)}


def _reference_runs(sched: crontab, zone_name: str, start: datetime, end: datetime) -> set:
    """The DST rules applied the slow way: walk real minutes and look at the wall clock."""
    zone_ = zone(zone_name)
    wildcard = sched.hour == frozenset(range(24))

    def named(wall: datetime) -> bool:
        in_month = wall.day in sched.day_of_month
        in_week = (wall.weekday() + 1) % 7 in sched.day_of_week
        both = sched.day_of_month != frozenset(range(1, 32)) and \
            sched.day_of_week != frozenset(range(7))
        day_ok = (in_month or in_week) if both else (in_month and in_week)
        return (day_ok and wall.month in sched.month_of_year and wall.hour in sched.hour
                and wall.minute in sched.minute)

    found = set()
    previous_wall = (start - timedelta(minutes=1)).astimezone(zone_).replace(tzinfo=None)
    instant = start
    while instant < end:
        local = instant.astimezone(zone_)
        wall = local.replace(tzinfo=None)
        if named(wall) and (local.fold == 0 or wildcard):
            found.add(instant)
        skipped = previous_wall + timedelta(minutes=1)
        while skipped < wall and not wildcard:  # wall times the clocks jumped over
            if named(skipped):
                found.add(instant)
            skipped += timedelta(minutes=1)
        previous_wall = wall
        instant += timedelta(minutes=1)
    return found


@pytest.mark.parametrize("zone_name,start", [
    (LONDON, utc(2026, 3, 28, 12)), (LONDON, utc(2026, 10, 24, 12)),
    (NEW_YORK, utc(2026, 3, 7, 12)), (NEW_YORK, utc(2026, 10, 31, 12)),
    ("Australia/Lord_Howe", utc(2026, 4, 4)),     # falls back 30 minutes
    ("Australia/Lord_Howe", utc(2026, 10, 3)),    # springs forward 30 minutes
    ("Pacific/Apia", utc(2011, 12, 29)),          # skipped the whole of 2011-12-30
])
@pytest.mark.parametrize("fields", [
    {"minute": 30, "hour": 1}, {"minute": 30, "hour": 2}, {"minute": "*/15", "hour": "1-2"},
    {"minute": "0,45", "hour": "0-3"}, {"minute": 30}, {"minute": "*/20"},
    {"minute": 0, "hour": 12},
])
def test_dst_rules_match_minute_by_minute_reference(zone_name, start, fields):
    sched = crontab(tz=zone_name, **fields)
    end = start + timedelta(days=2)
    expected = _reference_runs(sched, zone_name, start, end)
    assert set(runs_between(sched, start - timedelta(microseconds=1), end)) == expected


def test_schedule_ignores_dst():
    zone(LONDON)
    sched = schedule(timedelta(hours=1), tz=LONDON)
    assert sched.next_run_after(utc(2026, 3, 29, 0, 30)) == utc(2026, 3, 29, 1, 30)
    assert sched.next_run_after(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 25, 1, 30)


# -- timezone -------------------------------------------------------------------------------------

def test_timezone_comes_from_app_conf():
    zone(LONDON)
    app = App("proj", set_as_current=False, timezone=LONDON)
    nine = crontab(minute=0, hour=9, app=app)
    assert nine.tz is zone(LONDON)
    assert nine.next_run_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 8)   # BST
    assert nine.next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 9)   # GMT
    app.conf.timezone = NEW_YORK
    assert nine.next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 14)


def test_timezone_defaults_to_utc():
    assert crontab(minute=0, hour=9).next_run_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 9)
    app = App("proj", set_as_current=False)
    assert app.conf.timezone is None
    in_app = crontab(minute=0, hour=9, app=app)
    assert in_app.next_run_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 9)
    assert schedules._zone_name(in_app.tz) == "UTC"


def test_tz_keyword_and_attribute_override_the_app():
    zone(LONDON)
    zone(NEW_YORK)
    app = App("proj", set_as_current=False, timezone=LONDON)
    nine = crontab(minute=0, hour=9, app=app, tz=NEW_YORK)
    assert nine.next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 14)
    nine.tz = "UTC"
    assert nine.next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 9)
    nine.tz = None
    assert nine.next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 9)  # London, in winter
    assert nine.next_run_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 8)


def test_unknown_timezone_is_a_value_error():
    with pytest.raises(ValueError, match=re.escape("unknown timezone: 'Mars/Olympus_Mons'")):
        crontab(tz="Mars/Olympus_Mons")
    app = App("proj", set_as_current=False, timezone="Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="unknown timezone"):
        crontab(app=app).next_run_after(utc(2026, 1, 1))


# -- is_due ---------------------------------------------------------------------------------------

def test_crontab_due_exactly_at_the_boundary_not_before():
    clock = Clock(utc(2026, 5, 4, 9, 59, 59))
    quarter = crontab(minute="*/15", nowfun=clock)
    assert quarter.is_due(utc(2026, 5, 4, 9, 45)) == schedstate(False, 1.0)
    clock.now = utc(2026, 5, 4, 9, 59, 59, 999999)
    assert quarter.is_due(utc(2026, 5, 4, 9, 45)).is_due is False
    clock.now = utc(2026, 5, 4, 10, 0)
    assert quarter.is_due(utc(2026, 5, 4, 9, 45)) == schedstate(True, 900.0)
    assert isinstance(quarter.is_due(utc(2026, 5, 4, 9, 45)).next, float)


def test_crontab_catches_up_once_after_downtime():
    clock = Clock(utc(2026, 5, 4, 10, 7))
    quarter = crontab(minute="*/15", nowfun=clock)
    # last ran three days ago: due now, once
    assert quarter.is_due(utc(2026, 5, 1, 10, 0)) == schedstate(True, 480.0)
    # the run is recorded at now: nothing more until the next future slot
    assert quarter.is_due(clock.now) == schedstate(False, 480.0)
    clock.now = utc(2026, 5, 4, 10, 15)
    assert quarter.is_due(utc(2026, 5, 4, 10, 7)) == schedstate(True, 900.0)


def test_crontab_next_check_is_capped_but_remaining_is_not():
    clock = Clock(utc(2026, 5, 4, 12, 0))
    midnight = crontab(minute=0, hour=0, nowfun=clock)
    state = midnight.is_due(utc(2026, 5, 4, 0, 0))
    assert state == schedstate(False, MAX_CHECK_INTERVAL)
    assert midnight.remaining_estimate(utc(2026, 5, 4, 0, 0)) == timedelta(hours=12)
    assert midnight.remaining_estimate(utc(2026, 5, 2, 0, 0)) == timedelta(hours=-36)


def test_schedule_due_after_run_every():
    clock = Clock(utc(2026, 5, 4, 10, 0, 0))
    every_30s = schedule(30, nowfun=clock)
    assert every_30s.is_due(utc(2026, 5, 4, 9, 59, 31)) == schedstate(False, 1.0)
    assert every_30s.is_due(utc(2026, 5, 4, 9, 59, 30)) == schedstate(True, 30.0)
    # downtime: due once, then the next run is a full period after the recorded one
    assert every_30s.is_due(utc(2026, 5, 1)) == schedstate(True, 30.0)
    assert every_30s.is_due(clock.now) == schedstate(False, 30.0)
    assert every_30s.remaining_estimate(utc(2026, 5, 4, 9, 59, 40)) == timedelta(seconds=10)


def test_schedule_accepts_seconds_and_timedelta():
    assert schedule(30).run_every == timedelta(seconds=30)
    assert schedule(2.5).run_every == timedelta(seconds=2.5)
    assert schedule(run_every=timedelta(minutes=5)).run_every == timedelta(minutes=5)
    assert schedule(timedelta(minutes=5)).seconds == 300.0
    assert schedule(30).next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 0, 0, 30)


def test_relative_schedule_aligns_to_the_period():
    quarter = schedule(timedelta(minutes=15), relative=True)
    assert quarter.next_run_after(utc(2026, 5, 4, 10, 7, 30)) == utc(2026, 5, 4, 10, 15)
    assert quarter.next_run_after(utc(2026, 5, 4, 10, 15)) == utc(2026, 5, 4, 10, 30)
    assert quarter.next_run_after(utc(2026, 5, 4, 23, 50)) == utc(2026, 5, 5, 0, 0)
    clock = Clock(utc(2026, 5, 4, 10, 14, 59))
    quarter.nowfun = clock
    assert quarter.is_due(utc(2026, 5, 4, 10, 7)) == schedstate(False, 1.0)
    clock.now = utc(2026, 5, 4, 10, 15)
    assert quarter.is_due(utc(2026, 5, 4, 10, 7)) == schedstate(True, 900.0)
    daily = schedule(timedelta(days=1), relative=True)
    assert daily.next_run_after(utc(2026, 5, 4, 10, 7)) == utc(2026, 5, 5)


@pytest.mark.parametrize("value,message", [
    (0, "schedule run_every must be positive, got 0"),
    (-5, "schedule run_every must be positive, got -5"),
    (timedelta(0), "schedule run_every must be positive"),
    (float("nan"), "schedule run_every must be a finite number of seconds"),
    ("10", "schedule run_every must be seconds or a timedelta, got '10'"),
    (True, "schedule run_every must be seconds or a timedelta, got True"),
    (None, "schedule run_every must be seconds or a timedelta, got None"),
])
def test_schedule_validation(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedule(value)


def test_now_is_aware_utc():
    assert crontab().now().utcoffset() == timedelta(0)
    plus_two = timezone(timedelta(hours=2))
    clock = Clock(datetime(2026, 1, 1, 12, tzinfo=plus_two))
    assert schedule(10, nowfun=clock).now() == utc(2026, 1, 1, 10)
    assert schedule(10, nowfun=clock).now().tzinfo is UTC


# -- maybe_schedule -------------------------------------------------------------------------------

def test_maybe_schedule():
    assert maybe_schedule(None) is None
    assert maybe_schedule(10) == schedule(10)
    assert maybe_schedule(2.5).run_every == timedelta(seconds=2.5)
    assert maybe_schedule(timedelta(hours=1)) == schedule(3600)
    assert maybe_schedule(60, relative=True).relative is True
    app = App("proj", set_as_current=False)
    assert maybe_schedule(10, app=app).app is app
    cron = crontab(minute=5)
    assert maybe_schedule(cron, app=app) is cron
    assert cron.app is app
    assert maybe_schedule(cron).app is app  # no app given: the bound one stays


@pytest.mark.parametrize("value", ["*/5 * * * *", True, [10], {"seconds": 10}])
def test_maybe_schedule_rejects_other_values(value):
    with pytest.raises(ValueError, match="not a schedule"):
        maybe_schedule(value)


# -- equality, pickling, dicts, text --------------------------------------------------------------

def test_equality_compares_expanded_fields_and_zone():
    assert crontab(day_of_week="sun") == crontab(day_of_week=7) == crontab(day_of_week="Sunday")
    assert hash(crontab(day_of_week="sun")) == hash(crontab(day_of_week="0"))
    assert crontab(minute="*/20") == crontab(minute=[0, 20, 40])
    assert crontab(minute=5) != crontab(minute=6)
    assert crontab(minute=5, tz="UTC") != crontab(minute=5, tz=LONDON)
    assert schedule(60) == schedule(timedelta(minutes=1))
    assert schedule(60) != schedule(60, relative=True)
    assert schedule(60) != crontab()


@pytest.mark.parametrize("sched", [
    schedule(30), schedule(timedelta(minutes=15), relative=True),
    crontab(minute="*/5", hour="9-17", day_of_week="mon-fri"),
    crontab(minute=0, hour=0, day_of_month=29, month_of_year="feb"),
])
def test_pickle_round_trip(sched):
    copy = pickle.loads(pickle.dumps(sched))
    assert copy == sched
    assert type(copy) is type(sched)
    assert copy.next_run_after(utc(2026, 1, 1)) == sched.next_run_after(utc(2026, 1, 1))


def test_pickle_keeps_the_zone_but_not_app_or_nowfun():
    zone(LONDON)
    app = App("proj", set_as_current=False, timezone=LONDON)
    nine = crontab(minute=0, hour=9, app=app, nowfun=lambda: utc(2026, 1, 1))
    copy = pickle.loads(pickle.dumps(nine))
    assert copy.app is None and copy.nowfun is None
    assert copy.next_run_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 8)
    explicit = pickle.loads(pickle.dumps(crontab(minute=0, hour=9, tz=NEW_YORK)))
    assert explicit.next_run_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 14)


def test_copies_keep_app_and_nowfun():
    app = App("proj", set_as_current=False)
    clock = Clock(utc(2026, 1, 1))
    for sched in (crontab(minute=5, app=app, nowfun=clock), schedule(5, app=app, nowfun=clock)):
        for clone in (copy.copy(sched), copy.deepcopy(sched)):
            assert clone == sched and clone is not sched
            assert clone.app is app and clone.nowfun is clock


@pytest.mark.parametrize("sched,expected", [
    (schedule(30), {"type": "schedule", "run_every": 30.0, "relative": False}),
    (schedule(timedelta(minutes=15), relative=True),
     {"type": "schedule", "run_every": 900.0, "relative": True}),
    (crontab(minute="*/5", hour="9-17", day_of_week="Mon-Fri"),
     {"type": "crontab", "minute": "*/5", "hour": "9-17", "day_of_week": "mon-fri",
      "day_of_month": "*", "month_of_year": "*", "timezone": "UTC"}),
    (crontab(minute=[30, 0], hour=7, month_of_year=range(1, 13)),
     {"type": "crontab", "minute": "0,30", "hour": "7", "day_of_week": "*",
      "day_of_month": "*", "month_of_year": "*", "timezone": "UTC"}),
])
def test_to_dict_from_dict_round_trip(sched, expected):
    data = to_dict(sched)
    assert data == expected
    restored = from_dict(json.loads(json.dumps(data)))
    assert restored == sched
    assert to_dict(restored) == data


def test_from_dict_keeps_the_zone():
    zone(LONDON)
    data = to_dict(crontab(minute=0, hour=9, tz=LONDON))
    assert data["timezone"] == LONDON
    restored = from_dict(data)
    assert restored.next_run_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 8)
    # bound to an app, the app's zone is used again
    app = App("proj", set_as_current=False, timezone=NEW_YORK)
    assert maybe_schedule(restored, app=app).next_run_after(utc(2026, 7, 1)) == \
        utc(2026, 7, 1, 13)


@pytest.mark.parametrize("data,message", [
    ({"type": "solar"}, "unknown schedule type: 'solar'"),
    ({}, "unknown schedule type: None"),
    ([], "a schedule description must be a mapping"),
    ({"type": "schedule"}, "schedule description has no run_every"),
    ({"type": "schedule", "run_every": -1}, "schedule run_every must be positive"),
    ({"type": "crontab", "minute": "99"}, "crontab minute: 99 is out of range 0-59"),
    ({"type": "crontab", "timezone": "Nowhere/Town"}, "unknown timezone: 'Nowhere/Town'"),
])
def test_from_dict_errors(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        from_dict(data)


def test_to_dict_rejects_other_values():
    with pytest.raises(ValueError, match="cannot describe"):
        to_dict(10)


@pytest.mark.parametrize("sched,text", [
    (schedule(30), "every 30 seconds"),
    (schedule(1), "every second"),
    (schedule(0.5), "every 0.5 seconds"),
    (schedule(60), "every minute"),
    (schedule(timedelta(minutes=15)), "every 15 minutes"),
    (schedule(5400), "every 1 hour 30 minutes"),
    (schedule(timedelta(days=1)), "every day"),
    (schedule(timedelta(days=2, seconds=1)), "every 2 days 1 second"),
    (schedule(timedelta(minutes=15), relative=True), "every 15 minutes (aligned)"),
    (crontab(minute="*/5"), "*/5 * * * * (UTC)"),
    (crontab(minute=30, hour=9, day_of_week="MON-FRI"), "30 9 * * mon-fri (UTC)"),
    (crontab.from_string("0 4 1 jan *"), "0 4 1 jan * (UTC)"),
])
def test_human(sched, text):
    assert sched.human() == text


def test_repr():
    zone(LONDON)
    assert repr(schedule(30)) == "<schedule: every 30 seconds>"
    assert repr(crontab(minute="*/5", tz=LONDON)) == "<crontab: */5 * * * * (Europe/London)>"
    assert crontab(minute=0, hour=4).expression == "0 4 * * *"
