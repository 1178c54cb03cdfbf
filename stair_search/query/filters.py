"""Metadata filters: one syntax for the CLI, Python and HTTP, checked once and then matched row by row.

A filter maps metadata fields to conditions, all of which must hold:

- a value: equality (``{"colour": "red"}``); on a list field, membership (``{"tags": "dog"}``);
- a list: any of the values (``{"colour": ["red", "blue"]}``);
- an object of operators: ``eq``, ``any`` (a list), ``gt``, ``gte``, ``lt``, ``lte``
  (``{"year": {"gte": 2020, "lt": 2024}}``, ``{"taken": {"gte": "2023-01-01"}}``). Ranges compare numbers with
  numbers and text with text (ISO dates compare correctly as text); a value of another type never matches.
  A date bound is compared at its own precision, so that a range of days means what it says: against a value
  that is an ISO date or date-time (a photo's ``taken_at``, ``2019-06-30T18:05:00+02:00``), the bound
  ``2019-06-30`` (or ``2019-06``, ``2019``, or the number 2019 as a year) stands for that whole day (month,
  year): ``lte`` and ``gt`` include or exclude all of it, as ``gte`` and ``lt`` already did. A value's offset is
  not converted: a photo's date is the local date it was taken.

The CLI writes ``field=value``, ``field=a|b`` (any of), ``field>=x``, ``field>x``, ``field<=x``, ``field<x``,
or a whole filter as JSON; values that read as JSON (numbers, true, false, null) are taken as such.
How the index applies a filter before ranking (so that a rare filter still gets k hits) is the index's part
(``index/shard.py``: each shard keeps the rows that match before it ranks); this module only says what matches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPERATORS = ("eq", "any", "gt", "gte", "lt", "lte")
_CLI = re.compile(r"^\s*([^=<>!\s][^=<>]*?)\s*(>=|<=|=|>|<)\s*(.*)$")
_CLI_OPERATORS = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
# An ISO date, or date and time, down to any precision (a bound), and the start of an ISO date (a value).
_DATE_BOUND = re.compile(r"\d{4}(?:-\d{2}(?:-\d{2}(?:[T ]\d{2}(?::\d{2}(?::\d{2})?)?)?)?)?")
_DATE_VALUE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::\d{2}(?::\d{2})?)?)?")
_COMPARE = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b, "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b}


class FilterError(ValueError):
    """A filter that cannot be applied; the message names the field or the operator and the fix."""


@dataclass(frozen=True)
class Condition:
    field: str
    values: tuple[Any, ...] = ()  # equality with any of these (empty: no equality test)
    bounds: tuple[tuple[str, Any], ...] = ()  # (operator, bound) pairs, all of which must hold

    def holds(self, value: Any) -> bool:
        items = value if isinstance(value, list) else [value]
        return any(self._holds_one(item) for item in items)

    def _holds_one(self, value: Any) -> bool:
        if self.values and not any(_same(value, wanted) for wanted in self.values):
            return False
        return all(_in_range(value, op, bound) for op, bound in self.bounds)


@dataclass(frozen=True)
class Filter:
    conditions: tuple[Condition, ...]

    @property
    def fields(self) -> list[str]:
        return [c.field for c in self.conditions]

    def matches(self, metadata: Mapping[str, Any] | None) -> bool:
        metadata = metadata or {}
        return all(c.field in metadata and c.holds(metadata[c.field]) for c in self.conditions)

    def __bool__(self) -> bool:
        return bool(self.conditions)


def parse_filter(spec: Mapping[str, Any] | Filter | None) -> Filter:
    """A filter object (see the module docstring) -> :class:`Filter`, or a FilterError naming what is wrong."""
    if isinstance(spec, Filter):
        return spec
    if spec is None:
        return Filter(())
    if not isinstance(spec, Mapping):
        raise FilterError(f"a filter is an object of field: condition, got {type(spec).__name__}")
    return Filter(tuple(_condition(str(name), value) for name, value in spec.items()))


def _condition(name: str, value: Any) -> Condition:
    if isinstance(value, list):
        return Condition(name, values=tuple(value))
    if not isinstance(value, Mapping):
        return Condition(name, values=(value,))
    unknown = [op for op in value if op not in OPERATORS]
    if unknown or not value:
        raise FilterError(f"filter on '{name}': unknown operator(s) {unknown or '(none given)'}; use one of "
                          f"{list(OPERATORS)}, e.g. {{\"{name}\": {{\"gte\": 2020}}}}")
    values: tuple[Any, ...] = ()
    if "eq" in value:
        values = (value["eq"],)
    if "any" in value:
        if not isinstance(value["any"], list):
            raise FilterError(f"filter on '{name}': 'any' takes a list of values")
        values = (*values, *value["any"])
    bounds = tuple((op, value[op]) for op in ("gt", "gte", "lt", "lte") if op in value)
    for op, bound in bounds:
        if isinstance(bound, bool) or not isinstance(bound, int | float | str):
            raise FilterError(f"filter on '{name}': '{op}' takes a number or a text (e.g. an ISO date), "
                              f"got {json.dumps(bound)}")
    return Condition(name, values=values, bounds=bounds)


def parse_cli_filters(texts: Iterable[str]) -> dict[str, Any]:
    """``--filter`` arguments -> one filter object (conditions on the same field are combined)."""
    merged: dict[str, Any] = {}
    for text in texts:
        if text.lstrip().startswith("{"):
            try:
                given = json.loads(text)
            except ValueError as exc:
                raise FilterError(f"--filter {text!r} is not valid JSON: {exc}") from None
            for name, condition in dict(given).items():
                _merge(merged, name, condition)
            continue
        match = _CLI.match(text)
        if not match or not match.group(3):
            raise FilterError(f"--filter {text!r}: write field=value, field=a|b, field>=value (or >, <=, <), or "
                              f"a JSON object")
        name, op, raw = match.groups()
        if op == "=":
            values = [_value(v) for v in raw.split("|")]
            _merge(merged, name, values if len(values) > 1 else values[0])
        else:
            _merge(merged, name, {_CLI_OPERATORS[op]: _value(raw)})
    return merged


def _merge(merged: dict[str, Any], name: str, condition: Any) -> None:
    if name not in merged:
        merged[name] = condition
        return
    old = merged[name]
    as_ops = [c if isinstance(c, Mapping) else {"any": c if isinstance(c, list) else [c]} for c in (old, condition)]
    merged[name] = {**as_ops[0], **as_ops[1]}


def _value(text: str) -> Any:
    text = text.strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


def _same(value: Any, wanted: Any) -> bool:
    if isinstance(value, bool) or isinstance(wanted, bool):
        return value is wanted
    return value == wanted


def _in_range(value: Any, op: str, bound: Any) -> bool:
    """``value op bound``, a date value at the bound's precision (see the module docstring)."""
    if isinstance(value, str) and _DATE_VALUE.match(value):
        if isinstance(bound, int) and not isinstance(bound, bool) and 1000 <= bound <= 9999:
            bound = str(bound)  # a year given as a number (taken_at>=2019)
        if isinstance(bound, str) and _DATE_BOUND.fullmatch(bound):
            value, bound = value[: len(bound)].replace(" ", "T"), bound.replace(" ", "T")
    return _comparable(value, bound) and _COMPARE[op](value, bound)


def _comparable(value: Any, bound: Any) -> bool:
    if isinstance(value, bool):
        return False
    numbers = (int, float)
    return (isinstance(value, numbers) and isinstance(bound, numbers)) or (isinstance(value, str)
                                                                          and isinstance(bound, str))


def check_fields(flt: Filter, known: Sequence[str]) -> None:
    """A FilterError naming each filtered field that no document of the index has."""
    unknown = [name for name in flt.fields if name not in known]
    if unknown:
        shown = ", ".join(sorted(known)[:30]) or "none: its documents have no metadata"
        raise FilterError(f"unknown filter field(s) {unknown}: the index's metadata fields are {shown}")
