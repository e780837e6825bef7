"""Schedules for periodic tasks: fixed intervals (``schedule``) and cron expressions (``crontab``).

A scheduler asks a schedule two things: ``is_due(last_run_at)`` (send now? and how many
seconds until it should ask again) and ``next_run_after(when)`` (the first scheduled instant
strictly after ``when``). Instants are aware datetimes; they are converted to UTC on the way
in (a naive datetime is taken to be UTC) and returned in UTC.

Catching up: after downtime ``is_due`` is true once, however many runs were missed; once the
run is recorded at ``now`` the next run is the next future slot, so a scheduler that records
``last_run_at = now`` after each send never sends a burst.

Timezone: ``crontab`` reads its wall-clock fields in ``tz``: the ``tz=`` given to it, else the
bound app's ``conf.timezone`` (an IANA name, read through zoneinfo; UTC when it is None), else,
with no app bound, the zone it was pickled or stored in, else UTC. ``schedule`` counts elapsed time and ignores
the zone.

Daylight saving time, for ``crontab``:

- A wall-clock time that does not exist (the clocks jump forward over it, e.g. 01:30 on
  2026-03-29 in Europe/London, 02:30 on 2026-03-08 in America/New_York) is not skipped: a
  crontab that names it runs once that day, at the first instant after the gap (02:00 and
  03:00 local in those examples). Several named times inside one gap make that one run.
- A wall-clock time that happens twice (the clocks fall back, e.g. 01:30 on 2026-10-25 in
  Europe/London or on 2026-11-01 in America/New_York) runs once, at its first occurrence.
- Exception to both: a crontab whose hour field covers all 24 hours (``*``) keeps its real
  hourly cadence, as Vixie cron does for wildcard jobs. It runs in both occurrences of a
  repeated hour, and its wall-clock times inside a forward gap are not run at the gap's end
  (``minute=30`` runs at 00:30 GMT and then 02:30 BST, one real hour later).
"""
from __future__ import annotations

import calendar
import math
import numbers
import re
from datetime import MAXYEAR, date, datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional

__all__ = ["schedstate", "BaseSchedule", "schedule", "crontab", "maybe_schedule", "to_dict",
           "from_dict", "get_timezone", "MAX_CHECK_INTERVAL", "SEARCH_YEARS"]

UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: How far ahead a crontab is searched; every 8-year window holds a 29 February (2096 -> 2104).
SEARCH_YEARS = 8

#: The longest wait ``crontab.is_due`` suggests, so that a stepped system clock or an updated
#: zone database is noticed within the hour even by a scheduler that does not cap its sleep.
MAX_CHECK_INTERVAL = 3600.0


class schedstate(NamedTuple):
    """``is_due``'s answer: send now?, and seconds until the schedule should be asked again."""

    is_due: bool
    next: float


def get_timezone(value: Any) -> tzinfo:
    """A tzinfo for ``value``: a tzinfo as is, a name through zoneinfo; ValueError if unknown."""
    if isinstance(value, tzinfo):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"timezone must be an IANA name such as 'Europe/London', got {value!r}")
    name = value.strip()
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # ValueError: malformed keys ('../x')
        if name.upper() in ("UTC", "ETC/UTC"):  # a system without a zone database
            return UTC
        raise ValueError(f"unknown timezone: {name!r}") from None


def _zone_name(zone: tzinfo) -> str:
    return getattr(zone, "key", None) or ("UTC" if zone is UTC else str(zone))


def _as_utc(value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _micros(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


class BaseSchedule:
    """What every schedule offers the scheduler; subclasses define ``next_run_after``.

    ``nowfun`` (a callable returning a datetime) replaces the clock, e.g. in tests. Pickling
    keeps the fields and the resolved timezone, not ``app`` or ``nowfun``.
    """

    def __init__(self, nowfun: Optional[Callable[[], datetime]] = None, app: Any = None,
                 tz: Any = None) -> None:
        self.nowfun = nowfun
        self.app = app
        self._tz: Optional[tzinfo] = None if tz is None else get_timezone(tz)
        self._fallback_tz: Optional[tzinfo] = None

    # -- time ------------------------------------------------------------------------------

    @property
    def tz(self) -> tzinfo:
        """The zone wall-clock fields are read in (see the module docstring for the order)."""
        if self._tz is not None:
            return self._tz
        if self.app is not None:
            return get_timezone(self._app_timezone() or "UTC")
        return self._fallback_tz or get_timezone("UTC")

    @tz.setter
    def tz(self, value: Any) -> None:
        self._tz = None if value is None else get_timezone(value)

    def _app_timezone(self) -> Any:
        return getattr(getattr(self.app, "conf", None), "timezone", None)

    def _tz_name(self) -> str:
        """The zone's name, without loading it (safe in ``repr`` and ``==``)."""
        if self._tz is not None:
            return _zone_name(self._tz)
        if self.app is not None:
            name = self._app_timezone() or "UTC"
            return name if isinstance(name, str) else _zone_name(name)
        return _zone_name(self._fallback_tz) if self._fallback_tz is not None else "UTC"

    def now(self) -> datetime:
        """The current instant, aware, in UTC (from ``nowfun`` when one was given)."""
        return _as_utc(self.nowfun()) if self.nowfun is not None else datetime.now(UTC)

    # -- the scheduler's questions ---------------------------------------------------------

    def next_run_after(self, when: datetime) -> datetime:
        """The first scheduled instant strictly after ``when`` (aware, UTC)."""
        raise NotImplementedError

    def is_due(self, last_run_at: datetime) -> schedstate:
        """Due when the first run after ``last_run_at`` is at or before now.

        ``next`` is the number of seconds until the schedule should be asked again: until the
        next future run, counted as if the run were sent now when it is due.
        """
        now = self.now()
        due_at = self.next_run_after(last_run_at)
        if due_at <= now:
            return schedstate(True, self._check_after(self.next_run_after(now) - now))
        return schedstate(False, self._check_after(due_at - now))

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        """Time from now until the first run after ``last_run_at``; negative when overdue."""
        return self.next_run_after(last_run_at) - self.now()

    def _check_after(self, delta: timedelta) -> float:
        return delta.total_seconds()

    # -- description -----------------------------------------------------------------------

    def human(self) -> str:
        """A short description for banners and listings."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.human()}>"

    def _init_args(self) -> tuple:  # what __init__ takes to rebuild this schedule
        raise NotImplementedError

    def __copy__(self) -> "BaseSchedule":
        # The fields are immutable, so a shallow copy is a full one; it keeps app and nowfun.
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> "BaseSchedule":
        return self.__copy__()

    def __reduce__(self) -> tuple:
        state = {"_tz": self._tz, "_fallback_tz": None if self._tz is not None else self.tz}
        return (type(self), self._init_args(), state)


# -- fixed intervals ----------------------------------------------------------------------------

def _as_interval(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"schedule run_every must be a finite number of seconds, "
                             f"got {value!r}")
        try:
            delta = timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"schedule run_every is too large: {value!r}") from None
    else:
        raise ValueError(f"schedule run_every must be seconds or a timedelta, got {value!r}")
    if delta <= timedelta(0):
        raise ValueError(f"schedule run_every must be positive, got {value!r}")
    return delta


def _humanize(delta: timedelta) -> str:
    """``every 15 minutes``, ``every hour``, ``every 1 hour 30 minutes``, ``every 0.5 seconds``."""
    rest = _micros(delta)
    parts: list[tuple[Any, str]] = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        count, rest = divmod(rest, size * 1_000_000)
        if count:
            parts.append((count, unit))
    if rest:
        parts.append((rest // 1_000_000 if rest % 1_000_000 == 0 else rest / 1_000_000, "second"))
    if len(parts) == 1 and parts[0][0] == 1:
        return f"every {parts[0][1]}"
    return "every " + " ".join(f"{count if isinstance(count, int) else format(count, 'g')} "
                               f"{unit}{'' if count == 1 else 's'}" for count, unit in parts)


class schedule(BaseSchedule):
    """Run every ``run_every`` (seconds or a timedelta) of elapsed time; zones play no part.

    Due when ``now >= last_run_at + run_every``. With ``relative=True`` the runs are aligned
    to the period instead, counted from the Unix epoch: every 15 minutes runs at :00, :15,
    :30 and :45, every day at 00:00 UTC; due when such a slot after ``last_run_at`` has come.
    """

    def __init__(self, run_every: Any, relative: bool = False,
                 nowfun: Optional[Callable[[], datetime]] = None, app: Any = None,
                 tz: Any = None) -> None:
        super().__init__(nowfun=nowfun, app=app, tz=tz)
        self.run_every = _as_interval(run_every)
        self.relative = bool(relative)

    @property
    def seconds(self) -> float:
        return self.run_every.total_seconds()

    def next_run_after(self, when: datetime) -> datetime:
        when = _as_utc(when)
        if not self.relative:
            return when + self.run_every
        period = _micros(self.run_every)
        slot = _micros(when - _EPOCH) // period + 1
        return _EPOCH + timedelta(microseconds=slot * period)

    def human(self) -> str:
        return _humanize(self.run_every) + (" (aligned)" if self.relative else "")

    def _init_args(self) -> tuple:
        return (self.run_every, self.relative)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, schedule):
            return NotImplemented
        return (self.run_every, self.relative) == (other.run_every, other.relative)

    def __hash__(self) -> int:
        return hash((self.run_every, self.relative))


# -- cron expressions ---------------------------------------------------------------------------

_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_DAY_NAMES = {**{name: i for i, name in enumerate(_DAYS)},
              **{name[:3]: i for i, name in enumerate(_DAYS)}}
_MONTH_NAMES = {**{name: i for i, name in enumerate(_MONTHS, 1)},
                **{name[:3]: i for i, name in enumerate(_MONTHS, 1)}}
#: The longest each month can be (February in a leap year).
_MONTH_MAX_DAYS = {month: calendar.monthrange(2028, month)[1] for month in range(1, 13)}


class _Field(NamedTuple):
    name: str
    lo: int
    hi: int  # the largest number accepted (7 for day_of_week: Sunday again, as in cron)
    star_hi: int  # the largest value ``*`` stands for
    names: Mapping[str, int]
    what: str

    @property
    def full(self) -> frozenset:
        return frozenset(range(self.lo, self.star_hi + 1))


_MINUTE = _Field("minute", 0, 59, 59, {}, "a number")
_HOUR = _Field("hour", 0, 23, 23, {}, "a number")
_DAY_OF_WEEK = _Field("day_of_week", 0, 7, 6, _DAY_NAMES, "a number or a day name")
_DAY_OF_MONTH = _Field("day_of_month", 1, 31, 31, {}, "a number")
_MONTH_OF_YEAR = _Field("month_of_year", 1, 12, 12, _MONTH_NAMES, "a number or a month name")

_NICKNAMES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
              "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
              "@hourly": "0 * * * *"}


def _number(field: _Field, text: str, item: str) -> int:
    if text.isascii() and text.isdigit():
        return _in_range(field, int(text))
    if text in field.names:
        return field.names[text]
    if not text:
        raise ValueError(f"crontab {field.name}: cannot parse {item!r}")
    raise ValueError(f"crontab {field.name}: {text!r} is not {field.what}")


def _in_range(field: _Field, number: int) -> int:
    if not field.lo <= number <= field.hi:
        raise ValueError(f"crontab {field.name}: {number} is out of range {field.lo}-{field.hi}")
    return number


def _expand_item(field: _Field, item: str) -> Iterable[int]:
    """One comma-separated item: ``*``, ``N``, ``N-M`` (wrapping past the end when M < N,
    like ``fri-mon`` or ``22-2``), each optionally followed by ``/STEP``; ``N/STEP`` counts
    from N to the end of the range."""
    body, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()):
            raise ValueError(f"crontab {field.name}: cannot parse {item!r}")
        step = int(step_text)
        if step < 1:
            raise ValueError(f"crontab {field.name}: step must be at least 1 in {item!r}")
    if body == "*":
        values: Any = range(field.lo, field.star_hi + 1)
    elif "-" in body:
        if body.count("-") > 1:
            raise ValueError(f"crontab {field.name}: cannot parse {item!r}")
        first_text, _, last_text = body.partition("-")
        first, last = _number(field, first_text, item), _number(field, last_text, item)
        if first <= last:
            values = range(first, last + 1)
        else:
            values = [*range(first, field.star_hi + 1), *range(field.lo, last + 1)]
    else:
        first = _number(field, body, item)
        values = range(first, max(first, field.star_hi) + 1) if slash else [first]
    return values[::step]


def _expand(field: _Field, value: Any) -> tuple[frozenset, str]:
    """The set of numbers ``value`` stands for, and its text for cron expressions and dicts."""
    if isinstance(value, str):
        text = re.sub(r"\s+", "", value).lower()
        if not text:
            raise ValueError(f"crontab {field.name}: empty field")
        numbers_: set[int] = set()
        for item in text.split(","):
            numbers_.update(_expand_item(field, item))
    elif isinstance(value, int) and not isinstance(value, bool):
        numbers_, text = {_in_range(field, value)}, ""
    elif isinstance(value, (list, tuple, set, frozenset, range)):
        if not value:
            raise ValueError(f"crontab {field.name}: empty field")
        numbers_, text = set(), ""
        for element in value:
            if not isinstance(element, (str, int)) or isinstance(element, bool):
                raise ValueError(f"crontab {field.name}: {element!r} is not {field.what}")
            numbers_ |= _expand(field, element)[0]
    else:
        raise ValueError(f"crontab {field.name}: expected a string, a number or a list of "
                         f"them, got {value!r}")
    if field is _DAY_OF_WEEK:
        numbers_ = {number % 7 for number in numbers_}
    expanded = frozenset(numbers_)
    if not text:
        text = "*" if expanded == field.full else ",".join(map(str, sorted(expanded)))
    return expanded, text


def _gap_end(zone: tzinfo, before: datetime, after: datetime) -> datetime:
    """The transition instant between ``before`` (old offset) and ``after`` (new offset)."""
    target = after.astimezone(zone).utcoffset()
    low, high = math.floor(before.timestamp()), math.ceil(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, UTC).astimezone(zone).utcoffset() == target:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def _first_true(items: list, predicate: Callable[[Any], bool]) -> int:
    """The index of the first item ``predicate`` holds for, given it holds for all later ones."""
    low, high = 0, len(items)
    while low < high:
        middle = (low + high) // 2
        if predicate(items[middle]):
            high = middle
        else:
            low = middle + 1
    return low


class crontab(BaseSchedule):
    """Run at the wall-clock times a cron expression names, in ``tz`` (see the module docstring).

    Each field takes ``*``, ``*/n``, numbers, ranges (``1-5``, ``mon-fri``), ranges with
    steps (``0-30/10``) and lists (``1,15``), as a string, an int or a list of them. Days of
    the week are 0-6 from Sunday, 7 is Sunday too, and names (``sun``, ``Sunday``, ...) are
    accepted, as are month names (``jan``, ``January``, ...), case-insensitively. The fields
    are expanded to frozensets of ints; a bad value raises ValueError naming the field.

    Days follow Vixie cron: when both ``day_of_month`` and ``day_of_week`` are restricted, a
    day matches when EITHER matches (``day_of_month=13, day_of_week='fri'`` is the 13th and
    every Friday); when one of them covers its whole range, the other decides alone. A field
    counts as restricted when its set is not the whole range, so ``*/2`` is restricted.
    A crontab that can never match (``day_of_month=31, month_of_year=2``) raises ValueError.
    """

    def __init__(self, minute: Any = "*", hour: Any = "*", day_of_week: Any = "*",
                 day_of_month: Any = "*", month_of_year: Any = "*",
                 nowfun: Optional[Callable[[], datetime]] = None, app: Any = None,
                 tz: Any = None) -> None:
        super().__init__(nowfun=nowfun, app=app, tz=tz)
        self.minute, self._minute_text = _expand(_MINUTE, minute)
        self.hour, self._hour_text = _expand(_HOUR, hour)
        self.day_of_week, self._day_of_week_text = _expand(_DAY_OF_WEEK, day_of_week)
        self.day_of_month, self._day_of_month_text = _expand(_DAY_OF_MONTH, day_of_month)
        self.month_of_year, self._month_of_year_text = _expand(_MONTH_OF_YEAR, month_of_year)
        self._minutes = sorted(self.minute)
        self._hours = sorted(self.hour)
        self._hour_wildcard = self.hour == _HOUR.full
        self._days_restricted = self.day_of_month != _DAY_OF_MONTH.full
        self._weekdays_restricted = self.day_of_week != _DAY_OF_WEEK.full
        self._check_can_match()

    @classmethod
    def from_string(cls, expr: str, **kwargs: Any) -> "crontab":
        """``crontab.from_string('*/5 * * * *')``: the five cron fields, in cron's order
        (minute hour day-of-month month day-of-week), or ``@hourly``, ``@daily``, etc."""
        if not isinstance(expr, str):
            raise ValueError(f"crontab expression must be a string, got {expr!r}")
        text = _NICKNAMES.get(expr.strip().lower(), expr)
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(f"crontab expression needs 5 fields (minute hour day-of-month "
                             f"month day-of-week), got {len(fields)} in {expr!r}")
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        return cls(minute=minute, hour=hour, day_of_week=day_of_week,
                   day_of_month=day_of_month, month_of_year=month_of_year, **kwargs)

    def _check_can_match(self) -> None:
        # Every month has each weekday, so only day_of_month on its own can rule out a month.
        if self._weekdays_restricted or not self._days_restricted:
            return
        if any(min(self.day_of_month) <= _MONTH_MAX_DAYS[month] for month in self.month_of_year):
            return
        raise ValueError(f"crontab never matches: day_of_month {self._day_of_month_text} "
                         f"does not occur in month_of_year {self._month_of_year_text}")

    @property
    def expression(self) -> str:
        """The five fields as a cron expression (minute hour day-of-month month day-of-week)."""
        return " ".join((self._minute_text, self._hour_text, self._day_of_month_text,
                         self._month_of_year_text, self._day_of_week_text))

    # -- next run ----------------------------------------------------------------------------

    def _day_matches(self, day: date) -> bool:
        in_month = day.day in self.day_of_month
        in_week = (day.weekday() + 1) % 7 in self.day_of_week
        if self._days_restricted and self._weekdays_restricted:
            return in_month or in_week
        return in_month and in_week

    def _days_from(self, start: date) -> Iterator[date]:
        year, month, first_day = start.year, start.month, start.day
        for _ in range(12 * (SEARCH_YEARS + 1)):
            if month in self.month_of_year:
                for day in range(first_day, calendar.monthrange(year, month)[1] + 1):
                    if self._day_matches(date(year, month, day)):
                        yield date(year, month, day)
            first_day = 1
            month, year = (1, year + 1) if month == 12 else (month + 1, year)
            if year > MAXYEAR:
                return

    def _occurrences(self, wall: datetime, zone: tzinfo) -> tuple[tuple, datetime, datetime]:
        """The UTC instants the local wall time ``wall`` runs at under the DST rules, and the
        earliest and latest instant it can map to (both non-decreasing as ``wall`` grows)."""
        first = wall.replace(tzinfo=zone).astimezone(UTC)
        second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
        if first == second:
            return (first,), first, first
        if first < second:  # a repeated time: fold=0 is its first occurrence
            return ((first, second) if self._hour_wildcard else (first,)), first, second
        # A time in a forward gap: fold=0 reads it with the old offset (landing after the
        # jump), fold=1 with the new one (landing before it); the jump itself lies between.
        end = _gap_end(zone, second, first)
        return (() if self._hour_wildcard else (end,)), end, end

    def next_run_after(self, when: datetime) -> datetime:
        when = _as_utc(when)
        zone = self.tz
        last_minute = self._minutes[-1]
        best: Optional[datetime] = None
        # From the day before: a gap at midnight can move a wall time past its date.
        start = when.astimezone(zone).date() - timedelta(days=1)
        for day in self._days_from(start):
            midnight = datetime(day.year, day.month, day.day)

            def after_when(hour: int, minute: int) -> bool:
                wall = midnight.replace(hour=hour, minute=minute)
                return self._occurrences(wall, zone)[2] > when

            # Wall times before these indexes only run at or before ``when``.
            first_hour = _first_true(self._hours, lambda hour: after_when(hour, last_minute))
            for hour in self._hours[first_hour:]:
                first_minute = _first_true(self._minutes, lambda minute: after_when(hour, minute))
                for minute in self._minutes[first_minute:]:
                    wall = midnight.replace(hour=hour, minute=minute)
                    instants, earliest, _ = self._occurrences(wall, zone)
                    if best is not None and earliest >= best:
                        return best  # later wall times only map to later instants
                    for instant in instants:
                        if instant > when and (best is None or instant < best):
                            best = instant
        if best is None:
            raise RuntimeError(f"{self!r} has no run within {SEARCH_YEARS} years of {when}")
        return best

    def _check_after(self, delta: timedelta) -> float:
        return min(delta.total_seconds(), MAX_CHECK_INTERVAL)

    # -- description -------------------------------------------------------------------------

    def human(self) -> str:
        return f"{self.expression} ({self._tz_name()})"

    def _init_args(self) -> tuple:
        return (self._minute_text, self._hour_text, self._day_of_week_text,
                self._day_of_month_text, self._month_of_year_text)

    def _key(self) -> tuple:
        return (self.minute, self.hour, self.day_of_week, self.day_of_month, self.month_of_year)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, crontab):
            return NotImplemented
        return self._key() == other._key() and self._tz_name() == other._tz_name()

    def __hash__(self) -> int:
        return hash(self._key())


# -- conversions ---------------------------------------------------------------------------------

def maybe_schedule(value: Any, relative: bool = False, app: Any = None) -> Optional[BaseSchedule]:
    """A schedule from a ``beat_schedule`` value: seconds or a timedelta become ``schedule``;
    a schedule is returned as is (bound to ``app`` when one is given); None stays None."""
    if value is None:
        return None
    if isinstance(value, BaseSchedule):
        if app is not None:
            value.app = app
        return value
    if isinstance(value, timedelta) or (isinstance(value, numbers.Real)
                                        and not isinstance(value, bool)):
        return schedule(value, relative=relative, app=app)
    raise ValueError(f"not a schedule: {value!r} (expected seconds, a timedelta, "
                     f"schedule(...) or crontab(...))")


def to_dict(sched: BaseSchedule) -> dict:
    """A JSON-ready description: ``{"type": "schedule", "run_every": seconds, "relative": b}``
    or ``{"type": "crontab", <the five fields as text>, "timezone": name}``."""
    if isinstance(sched, schedule):
        return {"type": "schedule", "run_every": sched.seconds, "relative": sched.relative}
    if isinstance(sched, crontab):
        return {"type": "crontab", "minute": sched._minute_text, "hour": sched._hour_text,
                "day_of_week": sched._day_of_week_text,
                "day_of_month": sched._day_of_month_text,
                "month_of_year": sched._month_of_year_text, "timezone": sched._tz_name()}
    raise ValueError(f"cannot describe {sched!r} as a dict")


_CRONTAB_FIELDS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")


def from_dict(data: Mapping[str, Any]) -> BaseSchedule:
    """The schedule ``to_dict`` described. A crontab's timezone is kept as the zone to use
    when no ``tz`` is given and no app is bound. Bad data raises ValueError."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a schedule description must be a mapping, got {data!r}")
    kind = data.get("type")
    if kind == "schedule":
        if "run_every" not in data:
            raise ValueError("schedule description has no run_every")
        return schedule(data["run_every"], relative=bool(data.get("relative", False)))
    if kind == "crontab":
        sched = crontab(**{name: data.get(name, "*") for name in _CRONTAB_FIELDS})
        if data.get("timezone"):
            sched._fallback_tz = get_timezone(data["timezone"])
        return sched
    raise ValueError(f"unknown schedule type: {kind!r}")
