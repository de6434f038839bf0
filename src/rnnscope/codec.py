"""The one codec between result objects and JSON: tensors and non-finite floats in, out and
validated.

Strict JSON has no NaN or infinity, so a non-finite float is written as one of the three
tokens "nan", "inf", "-inf"; only this module writes or reads them. A tensor is written as a
nested list (rows of rows) of its values; a floating tensor whose dtype is not the field's
usual one is written as {"dtype": "float32", "data": [...]} so that it reads back bit for bit.

Reading goes through `Fields`, a view of one JSON object with its path
(`results['recurrent']['LSTM']['layers'][0]`): every read names the expected type, and a
missing field or a wrong type raises `SchemaError` saying which field and what was found, on
one line. Nothing is executed or evaluated while reading.

Example:
    >>> import math
    >>> encode_float(math.inf), decode_float("nan", "x") != decode_float("nan", "x")
    ('inf', True)
    >>> t = torch.tensor([[1.0, math.nan]], dtype=torch.float64)
    >>> encode_tensor(t)
    [[1.0, 'nan']]
    >>> torch.equal(decode_tensor([[1.0, 2.0]], "x", dtype=torch.float64, dim=2),
    ...             torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    True
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

SCHEMA = 1
"""Version of the results.json layout. Raise it when a field changes meaning or shape."""

_TOKENS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                 "float16": torch.float16, "bfloat16": torch.bfloat16}


class SchemaError(ValueError):
    """A JSON document that does not have the layout rnnscope writes (one line, naming the
    field)."""


def _type_name(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _got(v) -> str:
    """What was found, briefly: its JSON type, and a short string's text."""
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    return _type_name(v)


# ---- numbers ---------------------------------------------------------------------------------


def encode_float(v) -> float | str:
    """A float for strict JSON: finite floats as they are, non-finite ones as a token."""
    v = float(v)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def decode_float(v, where: str) -> float:
    """Inverse of `encode_float`: a JSON number or one of the tokens "nan", "inf", "-inf"."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and v in _TOKENS:
        return _TOKENS[v]
    raise SchemaError(f"{where} must be a number; got {_got(v)}")


def encode_value(v):
    """Plain JSON data with every float passed through `encode_float` (dicts, lists, tuples,
    str, int, bool, None); a tensor becomes its nested list. For configuration dicts."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return encode_float(v)
    if isinstance(v, torch.Tensor):
        return encode_tensor(v)
    if isinstance(v, dict):
        return {str(k): encode_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [encode_value(x) for x in v]
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


# ---- tensors ---------------------------------------------------------------------------------


def encode_tensor(t: torch.Tensor, *, default: torch.dtype | None = None):
    """A CPU tensor as nested lists (a 0-d tensor as one value). Floating values pass through
    `encode_float`. A floating tensor whose dtype differs from `default` (float64 unless
    given) is wrapped as {"dtype": name, "data": nested} so it reads back exactly."""
    t = t.detach().cpu()
    if t.dtype == torch.bool or not t.is_floating_point():
        return t.tolist()
    default = torch.float64 if default is None else default
    values = t.to(torch.float64).tolist() if t.dtype in (torch.float16, torch.bfloat16) \
        else t.tolist()
    data = _encode_floats(values)
    if t.dtype == default:
        return data
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": data}


def _encode_floats(v):
    if isinstance(v, list):
        if v and not isinstance(v[0], list) and all(math.isfinite(x) for x in v):
            return v  # the common case: a row of finite floats, kept as it is
        return [_encode_floats(x) for x in v]
    return encode_float(v)


def decode_tensor(v, where: str, *, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """A tensor of `dim` dimensions read from nested lists written by `encode_tensor`.

    `dtype` is the field's dtype: torch.bool (JSON booleans), torch.int64 (integers) or a
    floating dtype (numbers and the non-finite tokens; a {"dtype", "data"} wrapper may name
    another floating dtype). Ragged rows, wrong depth and wrong element types are refused.
    A dimension of size 0 before the last one cannot be told from nested lists; results never
    hold such tensors.
    """
    if dtype.is_floating_point and isinstance(v, dict):
        if set(v) != {"dtype", "data"} or v.get("dtype") not in _FLOAT_DTYPES:
            raise SchemaError(f"{where} must be a list of numbers or "
                              f"{{'dtype': one of {', '.join(_FLOAT_DTYPES)}, 'data': [...]}}; "
                              f"got an object with keys {sorted(map(str, v))[:5]}")
        dtype, v = _FLOAT_DTYPES[v["dtype"]], v["data"]
    shape = []
    rows = [v]
    for level in range(dim):
        n = None
        for r in rows:
            if not isinstance(r, list):
                raise SchemaError(f"{where} must be a {dim}-dimensional list (nested {dim} "
                                  f"deep); found {_got(r)} at depth {level}")
            if n is None:
                n = len(r)
            elif len(r) != n:
                raise SchemaError(f"{where} has rows of different lengths ({n} and {len(r)}) "
                                  f"at depth {level}")
        shape.append(n or 0)
        rows = [x for r in rows for x in r]
    if dtype == torch.bool:
        bad = next((x for x in rows if not isinstance(x, bool)), None)
        if bad is not None or (dim == 0 and not isinstance(v, bool)):
            raise SchemaError(f"{where} must hold booleans; found {_got(bad)}")
        flat = rows
    elif not dtype.is_floating_point:
        bad = next((x for x in rows if isinstance(x, bool) or not isinstance(x, int)), None)
        if bad is not None:
            raise SchemaError(f"{where} must hold integers; found {_got(bad)}")
        flat = rows
    else:
        flat = [x if (isinstance(x, float) or isinstance(x, int) and not isinstance(x, bool))
                else decode_float(x, where) for x in rows]
    return torch.tensor(flat, dtype=dtype).reshape(shape)


# ---- documents -------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise SchemaError(f"it holds the bare literal {name}, which is not JSON; rnnscope writes "
                      "non-finite numbers as the strings \"nan\", \"inf\", \"-inf\"")


def dumps(obj, *, indent: int | None = 1) -> str:
    """Strict JSON text (a NaN or infinity that escaped encoding raises ValueError).

    With `indent`, objects and lists of objects are laid out one entry per line, but a list
    that holds no object (an array of numbers, nested or not) is written on one line by the C
    encoder: `json.dumps(indent=1)` would put every number of a (50, 1000) profile on its own
    line through the pure-Python encoder (8.5 MB and 1.5 s for a T=1000 comparison).
    """
    if indent is None:
        return json.dumps(obj, allow_nan=False)
    out: list[str] = []
    _layout(obj, 0, indent, out)
    return "".join(out)


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _holds_object(x) -> bool:
    """Whether list x holds a dict at any depth; the element types are collected at C speed
    (a (50, 10 000) profile is half a million numbers)."""
    types = set(map(type, x))
    if types <= _SCALARS:
        return False
    if any(issubclass(t, dict) for t in types):
        return True
    return any(_holds_object(v) for v in x if isinstance(v, (list, tuple)))


def _layout(obj, level: int, indent: int, out: list[str]) -> None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        items = [(json.dumps(k) + ": ", v) for k, v in obj.items()]
        brackets = "{}"
    elif isinstance(obj, (list, tuple)) and obj and _holds_object(obj):
        items = [("", v) for v in obj]
        brackets = "[]"
    else:  # a scalar, an array without objects, or a dict with non-str keys (json's rules)
        out.append(json.dumps(obj, allow_nan=False, separators=(", ", ": ")))
        return
    pad = "\n" + " " * (indent * (level + 1))
    out.append(brackets[0])
    for i, (key, v) in enumerate(items):
        out.append(pad if i == 0 else "," + pad)
        out.append(key)
        _layout(v, level + 1, indent, out)
    out.append("\n" + " " * (indent * level) + brackets[1])


def loads(text: str) -> Any:
    """JSON text to plain data; the non-standard literals NaN/Infinity are refused."""
    return json.loads(text, parse_constant=_reject_constant)


def check_schema(d, where: str = "results") -> None:
    """Refuse a document without `"schema": SCHEMA` with a message saying what to do."""
    if not isinstance(d, dict):
        raise SchemaError(f"{where} must be a JSON object; got {_got(d)}")
    if "schema" not in d:
        raise SchemaError("written by an older rnnscope (no schema); rerun the command that "
                          "wrote it")
    s = d["schema"]
    if s != SCHEMA or isinstance(s, bool):
        raise SchemaError(f"{where}['schema'] is {s!r:.40}; this rnnscope reads schema {SCHEMA} "
                          "only (rerun the command with this version)")


class Fields:
    """A JSON object being read, with its path for error messages.

    Example:
        >>> f = Fields({"layer": 0, "mean": "nan"}, "results['gates']")
        >>> f.int("layer"), math.isnan(f.float("mean"))
        (0, True)
        >>> f.str("gate")
        Traceback (most recent call last):
        ...
        rnnscope.codec.SchemaError: results['gates']['gate'] is missing; expected a string
    """

    def __init__(self, d, where: str = "results"):
        if not isinstance(d, dict):
            raise SchemaError(f"{where} must be an object; got {_got(d)}")
        self.d = d
        self.where = where

    def at(self, key) -> str:
        return f"{self.where}[{key!r}]"

    def has(self, key: str) -> bool:
        return key in self.d

    def _get(self, key: str, expected: str, optional: bool):
        if key not in self.d:
            raise SchemaError(f"{self.at(key)} is missing; expected {expected}")
        v = self.d[key]
        if v is None and not optional:
            raise SchemaError(f"{self.at(key)} must be {expected}; got null")
        return v

    def int(self, key: str, *, low: int | None = None, optional: bool = False) -> int | None:
        what = "an integer" + ("" if low is None else f" >= {low}")
        v = self._get(key, what, optional)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
            raise SchemaError(f"{self.at(key)} must be {what}; got {_got(v)}"
                              + (f" {v}" if isinstance(v, int) and not isinstance(v, bool)
                                 else ""))
        return v

    def float(self, key: str, *, optional: bool = False) -> float | None:
        v = self._get(key, "a number", optional)
        return None if v is None else decode_float(v, self.at(key))

    def bool(self, key: str) -> bool:
        v = self._get(key, "true or false", False)
        if not isinstance(v, bool):
            raise SchemaError(f"{self.at(key)} must be true or false; got {_got(v)}")
        return v

    def str(self, key: str, *, choices=None, optional: bool = False) -> str | None:
        what = "a string" if choices is None else "one of " + ", ".join(map(repr, choices))
        v = self._get(key, what, optional)
        if v is None:
            return None
        if not isinstance(v, str) or (choices is not None and v not in choices):
            raise SchemaError(f"{self.at(key)} must be {what}; got {_got(v)}")
        return v

    def tensor(self, key: str, dtype: torch.dtype, dim: int, *,
               optional: bool = False) -> torch.Tensor | None:
        v = self._get(key, f"a {dim}-dimensional list", optional)
        return None if v is None else decode_tensor(v, self.at(key), dtype=dtype, dim=dim)

    def obj(self, key: str, *, optional: bool = False) -> Fields | None:
        v = self._get(key, "an object", optional)
        return None if v is None else Fields(v, self.at(key))

    def plain(self, key: str) -> dict:
        """A free-form object (a configuration, versions), copied as it is: its values are
        shown in the report (escaped), never computed with; the entries a reader computes
        with are checked through `obj(key)` as well."""
        if key not in self.d:
            raise SchemaError(f"{self.at(key)} is missing; expected an object")
        v = self.d[key]
        if not isinstance(v, dict):
            raise SchemaError(f"{self.at(key)} must be an object; got {_got(v)}")
        return dict(v)

    def list(self, key: str) -> list:
        v = self._get(key, "a list", False)
        if not isinstance(v, list):
            raise SchemaError(f"{self.at(key)} must be a list; got {_got(v)}")
        return v

    def objects(self, key: str) -> list[Fields]:
        """A list of objects."""
        return [Fields(x, f"{self.at(key)}[{i}]") for i, x in enumerate(self.list(key))]

    def mapping(self, key: str) -> dict[str, Fields]:
        """An object of objects, by name."""
        sub = self.obj(key)
        return {name: Fields(v, sub.at(name)) for name, v in sub.d.items()}
