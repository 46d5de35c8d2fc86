"""BACKUP_SCHEDULE (a cron expression) → systemd `OnCalendar=` expressions.

The backup runs from a systemd timer (deploy/chefia-rt-backup.timer), which speaks OnCalendar,
not cron. `chefia-rt backup --print-oncalendar` prints what to put in the timer for the
configured schedule. Supported: the standard five fields (minute hour day-of-month month
day-of-week) with `*`, numbers, names (jan-dec, sun-sat), lists, ranges and `/step`, and the
macros @yearly @annually @monthly @weekly @daily @midnight @hourly.

Cron runs a job when EITHER the day of month OR the day of week matches if both are restricted;
OnCalendar needs both to match, so that case becomes two expressions (a timer may carry several
`OnCalendar=` lines; it fires on their union).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import time as dt_time

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# systemd weekday names in ISO order (Monday first), indexed by cron number 1..7 (7 = Sunday).
_SYSTEMD_DAYS = {1: "Mon", 2: "Tue", 3: "Wed", 4: "Thu", 5: "Fri", 6: "Sat", 7: "Sun"}
# name, lowest, highest, names (value = index + offset)
_FIELDS = [
    ("minute", 0, 59, [], 0),
    ("hour", 0, 23, [], 0),
    ("day of month", 1, 31, [], 0),
    ("month", 1, 12, _MONTHS, 1),
    ("day of week", 0, 7, _DAYS, 0),
]


def _number(text: str, name: str, names: list[str], offset: int) -> int:
    lowered = text.lower()
    if lowered in names:
        return names.index(lowered) + offset
    if not text.isdigit():
        raise ValueError(f"{name}: {text!r} is not a number")
    return int(text)


def _values(field: str, index: int) -> set[int]:
    name, low, high, names, offset = _FIELDS[index]
    values: set[int] = set()
    for part in field.split(","):
        spec, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{name}: bad step {step_text!r}")
            step = int(step_text)
        if spec == "*":
            first, last = low, high
        elif "-" in spec:
            a, _, b = spec.partition("-")
            first, last = _number(a, name, names, offset), _number(b, name, names, offset)
        else:
            first = _number(spec, name, names, offset)
            # `5/15` (start/step) means "from 5 to the end", as in cronie and systemd.
            last = high if step_text else first
        if not low <= first <= high or not low <= last <= high:
            raise ValueError(f"{name}: {part!r} is outside {low}-{high}")
        if first > last:
            raise ValueError(f"{name}: range {part!r} runs backwards")
        values.update(range(first, last + 1, step))
    return values


def _runs(values: list[int], width: int) -> str:
    """Sorted values as a systemd list of values and `a..b` ranges."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        a, b = values[i], values[j]
        if j - i >= 2:
            parts.append(f"{a:0{width}d}..{b:0{width}d}")
        else:
            parts.extend(f"{v:0{width}d}" for v in values[i : j + 1])
        i = j + 1
    return ",".join(parts)


def _render(values: set[int], index: int) -> str:
    _, low, high, _, _ = _FIELDS[index]
    if values == set(range(low, high + 1)):
        return "*"
    return _runs(sorted(values), 2)


def _weekdays(values: set[int]) -> str:
    iso = sorted({7 if v in (0, 7) else v for v in values})
    if iso == list(range(1, 8)):
        return ""
    parts, i = [], 0
    while i < len(iso):
        j = i
        while j + 1 < len(iso) and iso[j + 1] == iso[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{_SYSTEMD_DAYS[iso[i]]}..{_SYSTEMD_DAYS[iso[j]]}")
        else:
            parts.extend(_SYSTEMD_DAYS[v] for v in iso[i : j + 1])
        i = j + 1
    return ",".join(parts)


def cron_to_oncalendar(expression: str) -> list[str]:
    """The OnCalendar= expressions (one or two) that fire exactly when the cron expression does.

    Raises ValueError naming the field that is wrong.
    """
    text = " ".join(expression.split())
    text = _MACROS.get(text.lower(), text)
    if text.startswith("@"):
        raise ValueError(f"unsupported cron macro {text!r}")
    fields = text.split(" ")
    if len(fields) != 5:
        raise ValueError(
            f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}"
        )
    values = [_values(field, i) for i, field in enumerate(fields)]
    minute, hour, dom, month = (_render(values[i], i) for i in range(4))
    weekdays = _weekdays(values[4])
    time = f"{hour}:{minute}:00"
    # Vixie cron's rule: a day field starting with `*` does not restrict the day.
    if not fields[2].startswith("*") and not fields[4].startswith("*") and weekdays:
        return [f"*-{month}-{dom} {time}", f"{weekdays} *-{month}-* {time}"]
    prefix = f"{weekdays} " if weekdays else ""
    return [f"{prefix}*-{month}-{dom} {time}"]


def _parse(expression: str) -> tuple[list[set[int]], bool]:
    """The five fields' values, and whether the day fields combine with OR (both restricted)."""
    text = " ".join(expression.split())
    text = _MACROS.get(text.lower(), text)
    fields = text.split(" ")
    if text.startswith("@") or len(fields) != 5:
        cron_to_oncalendar(expression)  # raises the error that names the problem
    values = [_values(field, i) for i, field in enumerate(fields)]
    return values, not fields[2].startswith("*") and not fields[4].startswith("*")


def next_run(expression: str, after: datetime) -> datetime:
    """The first moment after `after` (a whole minute, in after's time zone) when the cron
    expression fires, as cron and the timer deploy.sh writes from it do. `chefia-rt backup
    --schedule` (docker-compose.yml's backup service) waits for it."""
    values, either_day = _parse(expression)
    minutes, hours, days, months, weekdays = values
    iso_weekdays = {7 if v in (0, 7) else v for v in weekdays}
    start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = start.date()
    for _ in range(366 * 8 + 1):  # Feb 29 on a given weekday comes back within 28 years
        by_month_day = day.day in days
        by_weekday = day.isoweekday() in iso_weekdays
        matches = (by_month_day or by_weekday) if either_day else (by_month_day and by_weekday)
        if day.month in months and matches:
            for hour in sorted(hours):
                for minute in sorted(minutes):
                    moment = datetime.combine(day, dt_time(hour, minute), after.tzinfo)
                    if moment >= start:
                        return moment
        day += timedelta(days=1)
    raise ValueError(f"{expression!r} never fires (no such day)")
