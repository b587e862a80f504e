"""What every edge schema shares: strict pydantic TypedDicts (plain dicts out, no coercion) and the
translation of a validation failure into a 400 that names the parameter's path.

The schemas are TypedDicts validated by a ``TypeAdapter`` (``bench/validation_bench.py`` measured this
against msgspec and the old hand-written checks; see the README design section).  Validation returns
plain ``dict``/``list`` values, so the canonical model stays plain dicts; ``extra="allow"`` keeps
fields the schema does not name (OpenAI-compatible upstreams receive them untouched), and ``strict``
means a string is never taken for a number nor a boolean for an integer."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from ...errors import GatewayError, bad_request

OPEN = ConfigDict(extra="allow", strict=True)      # objects whose unknown fields pass through
CLOSED = ConfigDict(extra="forbid", strict=True)   # objects whose every field is ours

# Integer bounds: big enough for any real value, small enough for every counter and database column.
INT32 = 2**31 - 1
INT64 = 2**63 - 1
PosInt = Annotated[int, Field(ge=1, le=INT32)]
NonNegInt = Annotated[int, Field(ge=0, le=INT32)]
Int64 = Annotated[int, Field(ge=-INT64 - 1, le=INT64)]


def number(ge: float | None = None, le: float | None = None) -> Any:
    """A JSON number in [ge, le], kept as sent: an integer stays an ``int`` (``"temperature": 0`` goes
    upstream as ``0``, not ``0.0``), a float a ``float``."""
    return Union[Annotated[int, Field(ge=ge, le=le)], Annotated[float, Field(ge=ge, le=le, allow_inf_nan=False)]]


Number = number()

_PLAIN = {"model_attributes_type": "must be an object", "dict_type": "must be an object",
          "list_type": "must be an array", "string_type": "must be a string", "int_type": "must be an integer",
          "float_type": "must be a number", "bool_type": "must be a boolean", "int_from_float": "must be an integer",
          "none_required": "must be null"}
_TYPE_ERRORS = ("_type", "_parsing", "literal_error", "union_tag_invalid", "is_instance_of")


def _path(loc: tuple[Any, ...], data: Any, style: Literal["brackets", "dots"], missing: bool = False) -> str:
    """The data path of a pydantic error location.  ``loc`` also holds union member labels (``str``,
    ``list[...]``, a tag value); following ``loc`` through the data keeps only the real keys.  For a
    missing field the last element of ``loc`` is the field's name."""
    out = ""
    cur = data
    last = len(loc) - 1
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and isinstance(part, str) and part in cur:
            out += ("." if out else "") + part
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out += f"[{part}]" if style == "brackets" else f".{part}"
            cur = cur[part]
        elif missing and i == last and isinstance(part, str):
            out += ("." if out else "") + part
    return out


def _pick(errors: list[Any], data: Any, style: Literal["brackets", "dots"]
          ) -> tuple[dict[str, Any], str, list[str]]:
    """The most specific error: the one deepest in the data (a union reports one error per member), and
    the types every union member wanted there (``must be a string or an array``)."""
    best: tuple[int, int] = (-1, 0)
    chosen = errors[0]
    path = ""
    paths = []
    for i, e in enumerate(errors):
        p = _path(e["loc"], data, style, e["type"] == "missing")
        paths.append(p)
        depth = p.count(".") + p.count("[")
        rank = (depth + (1 if p else 0), -i)
        if rank > best:
            best, chosen, path = rank, e, p
    if any(s in chosen["type"] for s in _TYPE_ERRORS):
        # a union member that took the value's type but not its value says more ("temperature": 1.5 with
        # le=1: "less than or equal to 1", not the int member's "must be an integer")
        for e, p in zip(errors, paths, strict=True):
            if p == path and e["type"] != "missing" and not any(s in e["type"] for s in _TYPE_ERRORS) \
                    and e["type"] != "int_from_float":
                return e, path, []
    wanted: list[str] = []
    for e, p in zip(errors, paths, strict=True):
        w = _PLAIN.get(e["type"])
        if p == path and w and e["type"] != "none_required" and w not in wanted:
            wanted.append(w)
    if chosen["type"] in ("union_tag_invalid", "union_tag_not_found"):
        field = str((chosen.get("ctx") or {}).get("discriminator", "")).strip("'")
        if field:
            path = f"{path}.{field}" if path else field
    return chosen, path, wanted


def error_from(exc: ValidationError, data: Any, style: Literal["brackets", "dots"] = "brackets") -> GatewayError:
    """A 400 naming the offending parameter (``messages[0].content[1].text``; Anthropic: ``messages.0...``)."""
    errors = exc.errors(include_url=False, include_input=False)
    e, path, wanted = _pick(errors, data, style)
    t = e["type"]
    if t == "missing":
        code = "missing_required_parameter"
        msg = "is required"
    elif t == "extra_forbidden":
        code = "unknown_parameter"
        msg = "is not a known parameter"
    elif t == "union_tag_invalid":
        ctx = e.get("ctx") or {}
        code = "invalid_value"
        msg = f"must be one of {ctx.get('expected_tags')}; got {ctx.get('tag')}"
    elif t == "union_tag_not_found":
        code = "missing_required_parameter"
        msg = "is required"
    else:
        code = "invalid_type" if any(s in t for s in _TYPE_ERRORS) else "invalid_value"
        msg = _PLAIN.get(t) or e["msg"][:1].lower() + e["msg"][1:]
        if len(wanted) > 1:   # a union: name every type it takes
            kinds = [w.removeprefix("must be ") for w in wanted]
            msg = "must be a number" if set(kinds) == {"an integer", "a number"} else "must be " + " or ".join(kinds)
    where = path or "body"
    return bad_request(f"'{where}': {msg}" if style == "brackets" else f"{where}: {msg}",
                       param=path or None, code=code)


def validator(tp: Any, style: Literal["brackets", "dots"] = "brackets") -> Callable[[Any], Any]:
    """``check(data)`` -> the validated data (plain dicts), or a 400 ``GatewayError`` naming the path."""
    adapter = TypeAdapter(tp)
    validate = adapter.validate_python

    def check(data: Any) -> Any:
        try:
            return validate(data)
        except ValidationError as exc:
            raise error_from(exc, data, style) from None
    return check
