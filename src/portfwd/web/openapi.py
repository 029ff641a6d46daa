"""The API's OpenAPI 3.1 document, made from the status types themselves (status.py), so the
schema served is the schema sent; tests validate every answer against it."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from portfwd import __version__
from portfwd.status import Snapshot

_ERROR = {"$ref": "#/components/schemas/Error"}


def schema_of(kind: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one annotation; a dataclass goes into `schemas` once, by name."""
    if kind is str:
        return {"type": "string"}
    if kind is bool:
        return {"type": "boolean"}
    if kind is int:
        return {"type": "integer"}
    if kind is float:
        return {"type": "number"}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is types.UnionType or origin is typing.Union:
        return {
            "anyOf": [schema_of(arg, schemas) if arg is not type(None) else {"type": "null"} for arg in args]
        }
    if origin is tuple:
        return {"type": "array", "items": schema_of(args[0], schemas)}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema_of(args[1], schemas)}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        name = kind.__name__
        if name not in schemas:
            schemas[name] = {}  # placeholder: a type that (indirectly) holds itself stops here
            hints = typing.get_type_hints(kind)
            fields = [item.name for item in dataclasses.fields(kind)]
            schemas[name] = {
                "type": "object",
                "description": (kind.__doc__ or "").strip().split("\n\n")[0],
                "properties": {field: schema_of(hints[field], schemas) for field in fields},
                "required": fields,
            }
        return {"$ref": f"#/components/schemas/{name}"}
    raise TypeError(f"no schema for {kind!r}")


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "The request could not be read (one line says what)",
        401: "No token, or the wrong one",
        403: "Refused: another site's request, a Host that is not this server, or actions are off",
        404: "No such rule, session or backend",
        409: "The action does not apply (a rule without backends, a reload that failed)",
        503: "Too many dashboards watching",
    }
    return {str(status): _answer(words[status], _ERROR) for status in statuses}


def document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    schemas: dict[str, Any] = {}
    status = schema_of(Snapshot, schemas)
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
        "description": "Every error: one line saying what was wrong and what to do.",
    }
    point = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
    schemas["History"] = {
        "type": "object",
        "description": "Bytes per second each way, per rule (`rule:NAME`) and tunnel (`tunnel:NAME`).",
        "properties": {
            "interval": {"type": "number"},
            "now": {"type": "number"},
            "series": {"type": "object", "additionalProperties": {"type": "array", "items": point}},
        },
        "required": ["interval", "now", "series"],
    }
    schemas["Info"] = {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "instance": {"type": "string"},
            "auth": {"enum": ["actions", "all"]},
            "actions": {"type": "boolean"},
        },
        "required": ["version", "instance", "auth", "actions"],
    }
    schemas["Done"] = {
        "type": "object",
        "properties": {"ok": {"const": True}},
        "required": ["ok"],
        "additionalProperties": True,
    }
    done = {"$ref": "#/components/schemas/Done"}
    action = {
        "security": [{"token": []}],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"type": "object", "additionalProperties": False}}},
        },
    }
    rule = {"name": "rule", "in": "path", "required": True, "schema": {"type": "string"}}
    session = {"name": "session", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
    close_body = {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"reason": {"type": "string", "maxLength": 200}},
                    "additionalProperties": False,
                }
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "portfwd",
            "version": __version__,
            "description": "The status of one portfwd instance, live, and what an operator may do to it. "
            'Actions need `Authorization: Bearer TOKEN` ([web] token); with auth = "all" reads do too.',
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/api/v1/info": {
                "get": {
                    "summary": "What this instance is",
                    "responses": {"200": _answer("Info", {"$ref": "#/components/schemas/Info"})},
                }
            },
            "/api/v1/status": {
                "get": {
                    "summary": "Everything `portfwd status --json` shows",
                    "responses": {"200": _answer("The status snapshot", status), **_errors(401, 403)},
                }
            },
            "/api/v1/history": {
                "get": {
                    "summary": "Byte rates of the last minutes",
                    "responses": {
                        "200": _answer("History", {"$ref": "#/components/schemas/History"}),
                        **_errors(401, 403),
                    },
                }
            },
            "/api/v1/events": {
                "get": {
                    "summary": "Live: a `history` event, then a `status` event (a Snapshot) every second; "
                    "each session list there holds at most 500 rows, `omitted` says how many more",
                    "responses": {
                        "200": {
                            "description": "text/event-stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 403, 503),
                    },
                }
            },
            "/api/v1/reload": {
                "post": {
                    **action,
                    "summary": "Re-read the config file (as SIGHUP)",
                    "responses": {"200": _answer("Reloaded", done), **_errors(400, 401, 403, 409)},
                }
            },
            "/api/v1/rules/{rule}/{verb}": {
                "post": {
                    **action,
                    "summary": "pause: new clients wait; drain: new ones refused, live ones go on; resume",
                    "parameters": [
                        rule,
                        {
                            "name": "verb",
                            "in": "path",
                            "required": True,
                            "schema": {"enum": ["pause", "drain", "resume"]},
                        },
                    ],
                    "responses": {
                        "200": _answer("The rule's mode now", done),
                        **_errors(400, 401, 403, 404, 409),
                    },
                }
            },
            "/api/v1/rules/{rule}/backends/{backend}/check": {
                "post": {
                    **action,
                    "summary": "Health-check one backend now",
                    "parameters": [
                        rule,
                        {"name": "backend", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _answer("The check's result", done),
                        **_errors(400, 401, 403, 404, 409),
                    },
                }
            },
            "/api/v1/sessions/{session}/close": {
                "post": {
                    **action,
                    "requestBody": close_body,
                    "summary": "Close a live session",
                    "parameters": [session],
                    "responses": {"200": _answer("Closed", done), **_errors(400, 401, 403, 404)},
                }
            },
            "/api/v1/sessions/{session}": {
                "delete": {
                    **action,
                    "requestBody": close_body,
                    "summary": "Close a live session",
                    "parameters": [session],
                    "responses": {"200": _answer("Closed", done), **_errors(400, 401, 403, 404)},
                }
            },
        },
    }
