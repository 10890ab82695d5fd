"""Declarative option schemas: one declaration per option drives validation,
defaults and the generated documentation (the ifupdown2 lesson).

Used for the daemon's own sections and for every plugin's ``[plugins.NAME]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: value kinds an option can have
STR, INT, FLOAT, BOOL = "str", "int", "float", "bool"
STR_LIST, TABLE_LIST = "str_list", "table_list"

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Option:
    """One configuration key."""

    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None  # for str, and for each item of str_list
    min: float | None = None
    max: float | None = None
    check: Check | None = None  # extra rule: returns what is wrong, or None
    item_check: Check | None = None  # for each item of a str_list
    table: Schema | None = None  # for table_list: the schema of each table
    max_items: int = 1024

    def describe_type(self) -> str:
        base = {
            STR: "string",
            INT: "integer",
            FLOAT: "number",
            BOOL: "boolean",
            STR_LIST: "list of strings",
            TABLE_LIST: "array of tables",
        }[self.kind]
        if self.choices:
            base += f" ({' | '.join(self.choices)})"
        if self.min is not None or self.max is not None:
            lo = "" if self.min is None else f"{self.min:g}"
            hi = "" if self.max is None else f"{self.max:g}"
            base += f" [{lo}..{hi}]"
        return base


@dataclass(frozen=True)
class Schema:
    """An ordered set of options (a TOML table)."""

    options: Mapping[str, Option] = field(default_factory=dict)
    help: str = ""

    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, opt in self.options.items():
            value = opt.default
            out[name] = list(value) if isinstance(value, list | tuple) else value
        return out


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Problem = tuple[tuple[Any, ...], str]  # (key path, what is wrong)


def check_value(opt: Option, value: Any, path: tuple[Any, ...]) -> tuple[Any, list[Problem]]:
    """Validate one value; return (normalised value, problems)."""
    problems: list[Problem] = []

    def bad(msg: str, where: tuple[Any, ...] = path) -> tuple[Any, list[Problem]]:
        problems.append((where, msg))
        return opt.default, problems

    if opt.kind == BOOL:
        if not isinstance(value, bool):
            return bad(f"must be true or false, not {_type_name(value)} {_short(value)}")
    elif opt.kind == INT:
        if isinstance(value, bool) or not isinstance(value, int):
            return bad(f"must be an integer, not {_type_name(value)} {_short(value)}")
    elif opt.kind == FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return bad(f"must be a number, not {_type_name(value)} {_short(value)}")
        if not math.isfinite(value):
            return bad(f"must be a finite number, not {value}")
        value = float(value)
    elif opt.kind == STR:
        if not isinstance(value, str):
            return bad(f"must be a string, not {_type_name(value)} {_short(value)}")
    elif opt.kind == STR_LIST:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return bad(f"must be a list of strings, not {_type_name(value)} {_short(value)}")
        if len(value) > opt.max_items:
            return bad(f"has {len(value)} items, at most {opt.max_items} allowed")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                return bad(
                    f"item {i + 1} must be a string, not {_type_name(item)} {_short(item)}"
                )
            if opt.choices and item not in opt.choices:
                return bad(
                    f"unknown value {item!r} (expected any of {', '.join(opt.choices)})"
                )
            if opt.item_check is not None:
                msg = opt.item_check(item)
                if msg:
                    return bad(msg)
        value = list(value)
    elif opt.kind == TABLE_LIST:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            return bad(f"must be an array of tables, not {_type_name(value)} {_short(value)}")
        if len(value) > opt.max_items:
            return bad(f"has {len(value)} entries, at most {opt.max_items} allowed")
        assert opt.table is not None
        tables = []
        for i, item in enumerate(value):
            table, sub = validate_table(opt.table, item, (*path, i))
            problems.extend(sub)
            tables.append(table)
        value = tables
    if opt.kind == STR and opt.choices and value not in opt.choices:
        return bad(f"must be one of {', '.join(opt.choices)} (got {_short(value)})")
    if opt.kind in (INT, FLOAT):
        if opt.min is not None and value < opt.min:
            return bad(f"must be at least {opt.min:g} (got {value})")
        if opt.max is not None and value > opt.max:
            return bad(f"must be at most {opt.max:g} (got {value})")
    if opt.check is not None:
        msg = opt.check(value)
        if msg:
            return bad(msg)
    return value, problems


def validate_table(
    schema: Schema, data: Mapping[str, Any], path: tuple[Any, ...] = ()
) -> tuple[dict[str, Any], list[Problem]]:
    """Validate a table against a schema: defaults filled, unknown keys reported."""
    problems: list[Problem] = []
    out = schema.defaults()
    for key, value in data.items():
        opt = schema.options.get(key)
        if opt is None:
            known = ", ".join(schema.options) or "none"
            problems.append(((*path, key), f"unknown key (known keys: {known})"))
            continue
        out[key], sub = check_value(opt, value, (*path, key))
        problems.extend(sub)
    return out, problems


def render_markdown(schema: Schema, section: str) -> str:
    """The documentation table of a schema (used by docs and ``check-config --schema``)."""
    lines = [f"### `[{section}]`", ""]
    if schema.help:
        lines += [schema.help, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, opt in schema.options.items():
        default = _toml_literal(opt.default)
        lines.append(f"| `{name}` | {opt.describe_type()} | `{default}` | {opt.help} |")
    lines.append("")
    for name, opt in schema.options.items():
        if opt.table is not None:
            lines.append(render_markdown(opt.table, f"[{section}.{name}]"))
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return str(value)
