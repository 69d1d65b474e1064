"""The OpenAPI 3 document of the API: the contract that tests and fuzzers check."""

from __future__ import annotations

from functools import cache
from typing import Any

_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
        },
    }


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
        },
    }


_UNAVAILABLE = {
    "description": "The database is unavailable or busy; retry after Retry-After seconds.",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": _error("")["content"],
}
_KEY_RULES = ("At most SERVICE_MAX_KEY_BYTES (1024) bytes in UTF-8, with no NUL character and "
              "no lone surrogate.")
_KEY_QUERY = {
    "name": "key", "in": "query", "required": False,
    "description": f"The key, when not given in the JSON body. {_KEY_RULES}",
    "schema": {"type": "string", "minLength": 1},
}
_VALUE_QUERY = {
    "name": "value", "in": "query", "required": False,
    "description": "The value, when not given in the JSON body.",
    "schema": {"type": "string"},
}


def _body(required: list[str]) -> dict[str, Any]:
    # Not the schema's "required": each member may come from the query string instead, which
    # a body schema cannot say; a request that gives one in neither place gets a 400.
    needed = " and ".join(required)
    return {
        "required": False,
        "description": f"A JSON object. It must give {needed}, unless the query string does; "
                       "a member given in both places must have one value. A member name "
                       "given twice is refused.",
        "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {
                "key": {"type": "string", "minLength": 1, "description": _KEY_RULES},
                "value": {
                    "description": "A number or boolean is stored as its JSON text, as the "
                                   "original stored it: 8080 as \"8080\", true as \"true\".",
                    "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}],
                },
            },
        }}},
    }


def _operation(
    summary: str, op_id: str, params: list[dict[str, Any]], body: dict[str, Any] | None,
    responses: dict[str, Any],
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "parameters": params,
        "responses": {
            **responses,
            "400": _error("The request is malformed; the message says what is wrong."),
            "413": _error("The body is larger than SERVICE_MAX_BODY_BYTES."),
            "415": _error("The body is compressed (Content-Encoding); send it uncompressed."),
            "501": _error("The body has a Transfer-Encoding other than chunked."),
            "503": _UNAVAILABLE,
        },
    }
    if body is not None:
        op["requestBody"] = body
    return op


@cache
def openapi_document() -> dict[str, Any]:
    not_found = _error("No variable has this key.")
    unknown = _error(
        "The database did not confirm the write in time: it may have been applied. Read the "
        "variable before retrying."
    )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "varstack variables API",
            "version": "1.0.0",
            "description": "Key/value variables over PostgreSQL. Answers are plain text, or JSON "
            "when the request sends Accept: application/json.",
        },
        "paths": {
            "/healthcheck": {"get": {
                "summary": "Whether this replica can serve requests",
                "operationId": "healthcheck",
                "responses": {
                    "200": _ok("The replica and its database answer.", "Health"),
                    "503": _UNAVAILABLE,
                },
            }},
            "/set_var": {"post": _operation(
                "Create a variable", "setVar", [_KEY_QUERY, _VALUE_QUERY], _body(["key", "value"]),
                {"201": _ok("Created.", "Variable"), "409": _error("The key already exists."),
                 "504": unknown},
            )},
            "/get_var": {"get": _operation(
                "Read a variable's value", "getVar", [_KEY_QUERY], _body(["key"]),
                {"200": _ok("The value (as text/plain, or JSON).", "Variable"), "404": not_found},
            )},
            "/edit_var": {"put": _operation(
                "Change a variable's value", "editVar", [_KEY_QUERY, _VALUE_QUERY],
                _body(["key", "value"]),
                {"200": _ok("Changed.", "Variable"), "404": not_found, "504": unknown},
            )},
            "/delete_var": {"delete": _operation(
                "Delete a variable", "deleteVar", [_KEY_QUERY], _body(["key"]),
                {"204": {"description": "Deleted; no body."}, "404": not_found,
                 "504": unknown},
            )},
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text format.", "content": _TEXT}},
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3 document.", "content": {
                    "application/json": {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {"schemas": {
            "Variable": {
                "type": "object",
                "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                "required": ["key", "value"],
            },
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            },
            "Health": {
                "type": "object",
                "properties": {"status": {"type": "string"}},
                "required": ["status"],
            },
        }},
    }
