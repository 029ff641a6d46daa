"""pydantic's validation errors as portfwd's one-line messages: `field.path: what is wrong; the fix`."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from portfwd.config.models import Config

_TYPE_MESSAGES = {
    "missing": "required key is missing; add it",
    "string_type": "must be text in quotes",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "model_type": "must be a table",
    "dict_type": "must be a table",
}


def _path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "config"


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """Walk the models along `loc` to find the one that owns the last key."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        found = None
        for candidate in _flatten(field.annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found = candidate
        if found is None:
            return None
        model = found
    return model


def _flatten(annotation: Any) -> Iterable[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            yield from _flatten(arg)
    else:
        yield annotation


def problem(error: Any) -> str:
    """One of pydantic's errors as portfwd's line: the field's path, what is wrong, and the fix."""
    loc: tuple[int | str, ...] = tuple(error["loc"])
    kind = error["type"]
    if kind == "portfwd":
        return f"{_path(loc)}: {error['ctx']['line']}"
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        names = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        if close:
            return f"{_path(loc)}: unknown key; did you mean {close[0]}?"
        return f"{_path(loc)}: unknown key; remove it or use one of: {', '.join(names)}"
    if kind in ("tuple_type", "list_type"):
        table = "forward.route" if loc and loc[-1] == "route" else (loc[-1] if loc else "")
        return f"{_path(loc)}: must be an array of tables; write [[{table}]]"
    if kind in _TYPE_MESSAGES:
        return f"{_path(loc)}: {_TYPE_MESSAGES[kind]}"
    message = str(error["msg"]).replace("Input should be", "must be")
    message = message.replace("String should have", "must have").replace("Value error, ", "")
    return f"{_path(loc)}: {message[:1].lower()}{message[1:]}"
