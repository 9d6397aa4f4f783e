"""When a schedule's ticks fall: 5-field cron expressions and fixed intervals (docs/orchestration.md#schedules).

Only the standard library: corral/config.py checks expressions with it, the conductor fires ticks with it.
"""

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

_FIELDS: Final = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
SEARCH_DAYS: Final = 400  # how far a tick is looked for, forwards or back


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"{name}: bad step {step_text!r}")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            if not (a.isdigit() and b.isdigit()):
                raise ValueError(f"{name}: bad range {base!r}")
            start, end = int(a), int(b)
        elif base.isdigit():
            start = int(base)
            end = high if step_text else start
        else:
            raise ValueError(f"{name}: {base!r} is not a number, a range or *")
        if not (low <= start <= high and low <= end <= high and start <= end):
            raise ValueError(f"{name}: {base!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A 5-field cron expression (minute hour day-of-month month day-of-week), in UTC."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday (7 too)
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> "Cron":
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
        fields = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in fields[4])
        return cls(text, fields[0], fields[1], fields[2], fields[3], weekdays, parts[2] == "*", parts[4] == "*")

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        day = t.day in self.days
        weekday = (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:  # cron: both restricted means either one
            return day and weekday
        return day or weekday

    def _step(self, t: datetime, forward: bool) -> datetime | None:
        t = t.replace(second=0, microsecond=0)
        one = timedelta(minutes=1 if forward else -1)
        for _ in range(SEARCH_DAYS * 1440):
            if t.month not in self.months:  # skip the month (cheap for yearly expressions)
                if forward:
                    days = calendar.monthrange(t.year, t.month)[1]
                    t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=days)).replace(day=1)
                else:
                    t = t.replace(day=1, hour=0, minute=0) - timedelta(minutes=1)
                continue
            if self.matches(t):
                return t
            t += one
        return None

    def previous(self, now: datetime) -> datetime | None:
        """The latest tick at or before `now`."""
        return self._step(now, forward=False)

    def next(self, after: datetime) -> datetime | None:
        """The first tick after `after`."""
        return self._step(after.replace(second=0, microsecond=0) + timedelta(minutes=1), forward=True)


@dataclass(frozen=True)
class Every:
    """A fixed interval, ticks aligned on the epoch (every 10m: :00, :10, ...)."""

    seconds: float

    def previous(self, now: datetime) -> datetime:
        ts = now.timestamp()
        return datetime.fromtimestamp(ts - ts % self.seconds, UTC)

    def next(self, after: datetime) -> datetime:
        return datetime.fromtimestamp(self.previous(after).timestamp() + self.seconds, UTC)
