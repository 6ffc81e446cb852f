"""StopChurn's published request contract, checked strictly: the routes, update and event batches, and the
historical-upload file. A request that breaks it raises :class:`_Invalid`, whose message is the 400's reason.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

UPDATE_ROUTE = "/client-data/update"
EVENT_ROUTE = "/client-data/event"
INSPECTION_PREFIX = "/_sandbox/"

#: Smallest and largest (exclusive) values accepted as epoch milliseconds: 1973-03-03 .. 5138-11-16.
EPOCH_MS_MIN = 10**11
EPOCH_MS_MAX = 10**14

_UPDATE_TYPES = ("insert", "update", "delete")
_UPDATE_KEYS = frozenset({"type", "data"})
_RECORD_KEYS = frozenset({"brandId", "tableName", "data", "createdAt", "updatedAt"})
_EVENT_KEYS = frozenset({"brandId", "userId", "name", "value"})
_HISTORICAL_KEYS = frozenset({"data", "createdAt", "updatedAt"})
#: StopChurn's documented limit of one historical-upload file.
HISTORICAL_MAX_BYTES = 2_000_000_000
_MISSING: Any = object()


class _Invalid(Exception):
    """A request that breaks the contract; the message is the ``<reason>`` of the 400 body."""


class _Op(NamedTuple):
    kind: str
    brand_id: int
    table_name: str
    key: tuple[str, Any]
    row: dict[str, Any]


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_extra_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    if len(obj) > len(allowed) or not allowed.issuperset(obj):
        extra = sorted(str(k) for k in obj if k not in allowed)
        if extra:
            raise _Invalid(f"{where} has unknown field(s): {', '.join(extra)}")


def _load_json(body: bytes, what: str) -> Any:
    """``body`` decoded; ``what`` names it (``"body"``, ``"the file"``) in the 400's reason when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Invalid(f"{what} is not valid JSON ({exc})") from None


def _parse_batch(body: bytes) -> list[Any]:
    payload = _load_json(body, "body")
    if type(payload) is not dict:
        raise _Invalid(f"body must be a JSON object with a 'data' array, got {_describe(payload)}")
    _check_extra_keys(payload, frozenset({"data"}), "body")
    items = payload.get("data", _MISSING)
    if type(items) is not list:
        raise _Invalid(f"body.data must be an array, got {_describe(items)}")
    return items


# The field checks below name the failing field by a ``where`` template (``"data[{}].data"``) that is formatted
# with the item's index only when the check fails: the accepted path of a large batch stays cheap.


def _integer(obj: dict[str, Any], field: str, where: str, i: int) -> int:
    value = obj.get(field, _MISSING)
    if type(value) is not int:
        raise _Invalid(f"{where.format(i)}.{field} must be an integer, got {_describe(value)}")
    return value


def _text(obj: dict[str, Any], field: str, where: str, i: int) -> str:
    value = obj.get(field, _MISSING)
    if type(value) is not str or not value:
        raise _Invalid(f"{where.format(i)}.{field} must be a non-empty string, got {_describe(value)}")
    return value


def _row(obj: dict[str, Any], where: str, i: int) -> tuple[tuple[str, Any], dict[str, Any]]:
    """The row under ``obj["data"]`` and its key ``(type name, id)``; its ``id`` is a string or a number."""
    row = obj.get("data", _MISSING)
    if type(row) is not dict:
        raise _Invalid(f"{where.format(i)}.data (the row) must be an object, got {_describe(row)}")
    row_id = row.get("id", _MISSING)
    id_type = type(row_id)
    if id_type is not str and id_type is not int and id_type is not float:
        raise _Invalid(f"{where.format(i)}.data.id must be a string or a number, got {_describe(row_id)}")
    return (id_type.__name__, row_id), row


def _check_stamps(obj: dict[str, Any], where: str, i: int) -> None:
    for stamp_field in ("createdAt", "updatedAt"):
        stamp = obj.get(stamp_field, _MISSING)
        if type(stamp) is not int or not EPOCH_MS_MIN <= stamp < EPOCH_MS_MAX:
            raise _Invalid(
                f"{where.format(i)}.{stamp_field} must be an integer epoch in milliseconds, got {_describe(stamp)}"
            )


def _validate_updates(items: list[Any]) -> list[_Op]:
    """Check every update of a batch against the contract; return them as operations, or raise."""
    ops: list[_Op] = []
    append = ops.append
    for i, update in enumerate(items):
        if type(update) is not dict:
            raise _Invalid(f"data[{i}] must be an object, got {_describe(update)}")
        kind = update.get("type", _MISSING)
        if type(kind) is not str or kind not in _UPDATE_TYPES:
            raise _Invalid(f"data[{i}].type must be one of insert, update, delete, got {_describe(kind)}")
        record = update.get("data", _MISSING)
        if type(record) is not dict:
            raise _Invalid(f"data[{i}].data must be an object, got {_describe(record)}")
        if len(update) != 2:
            _check_extra_keys(update, _UPDATE_KEYS, f"data[{i}]")
        brand_id = _integer(record, "brandId", "data[{}].data", i)
        table_name = _text(record, "tableName", "data[{}].data", i)
        key, row = _row(record, "data[{}].data", i)
        _check_stamps(record, "data[{}].data", i)
        if len(record) != 5:
            _check_extra_keys(record, _RECORD_KEYS, f"data[{i}].data")
        append(_Op(kind, brand_id, table_name, key, row))
    return ops


def _validate_events(items: list[Any]) -> list[dict[str, Any]]:
    """Check every event of a batch against the contract; return them, or raise.

    ``brandId`` an integer, ``userId`` and ``name`` non-empty strings (the documentation sends ``"553"``, a
    string), ``value`` optional and of any JSON type (its type is set per event in StopChurn, not here).
    """
    allowed = _EVENT_KEYS
    for i, event in enumerate(items):
        if type(event) is not dict:
            raise _Invalid(f"data[{i}] must be an object, got {_describe(event)}")
        size = len(event)
        if not (size == 4 and "value" in event) and not (size == 3 and "value" not in event):
            _check_extra_keys(event, allowed, f"data[{i}]")  # the three fields below are checked one by one
        _integer(event, "brandId", "data[{}]", i)
        _text(event, "userId", "data[{}]", i)
        _text(event, "name", "data[{}]", i)
    return items


def _validate_historical(body: bytes) -> list[tuple[tuple[str, Any], dict[str, Any]]]:
    """Check one historical-upload file; return its rows as ``(key, row)``, or raise.

    The file is a JSON array of ``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>}`` (exactly those keys),
    each row an object with an ``id`` that is a string or a number; an ``id`` may appear once per file.
    """
    items = _load_json(body, "the file")
    if type(items) is not list:
        raise _Invalid(f"the file must be a JSON array, got {_describe(items)}")
    rows: list[tuple[tuple[str, Any], dict[str, Any]]] = []
    seen: set[tuple[str, Any]] = set()
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise _Invalid(f"[{i}] must be an object, got {_describe(item)}")
        if len(item) != 3 or not _HISTORICAL_KEYS.issuperset(item):
            missing = sorted(_HISTORICAL_KEYS - set(item))
            if missing:
                raise _Invalid(f"[{i}] lacks {', '.join(missing)}")
            _check_extra_keys(item, _HISTORICAL_KEYS, f"[{i}]")
        key, row = _row(item, "[{}]", i)
        _check_stamps(item, "[{}]", i)
        if key in seen:
            raise _Invalid(f"[{i}].data.id {key[1]!r} appears twice in the file")
        seen.add(key)
        rows.append((key, row))
    return rows
