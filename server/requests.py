"""Request bodies: JSON, or multipart/form-data with an ``image`` file and the other fields (as form fields or as
one JSON ``request`` field), validated into the schemas' models.

Why one parser for every body: clients send anything (issue 36 found 500s from a ``request`` field whose
``rerank`` was a number, from 5,000 nested brackets, and from a form field merged into a JSON value of another
type). Here every body, whatever its shape, ends as a validated model or as a 4xx naming the field: JSON text in
a form field is bounded in size before ``json.loads`` and in nesting depth after it (its RecursionError on a
depth bomb is caught), its numbers must be finite, a field given twice is refused (a list field's values are
merged), and every type is checked by the pydantic schemas, never by the code that merges the fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.imaging import ImageRejected
from server.limits import ECHO_CHARS, clip

T = TypeVar("T", bound=BaseModel)

MAX_JSON_DEPTH = 16  # the deepest legitimate body: requests -> search -> filters -> field -> any -> value
MAX_FIELD_BYTES = 1024 * 1024  # one multipart text field (Starlette's cap on a part, set here)
MAX_FORM_FIELDS = 32
MAX_ERRORS_SHOWN = 8  # validation errors listed in one answer
TEXT_LIST, JSON_VALUE, TEXT = "comma-separated list", "JSON", "text"  # how a form field of each kind is read

_UPLOAD_BODY = {"content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/{name}"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"},
        "request": {"type": "string", "description": "the other fields as a JSON object"}}}},
}, "required": True}


def body_doc(name: str, multipart: bool = True) -> dict:
    """The OpenAPI requestBody of a route that parses its body itself (``multipart``: an upload is accepted)."""
    doc = {"required": True, "content": {k: dict(v) for k, v in _UPLOAD_BODY["content"].items() if multipart
                                         or k == "application/json"}}
    doc["content"]["application/json"] = {"schema": {"$ref": f"#/components/schemas/{name}"}}
    return doc


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ('' when none is given)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def parse_body(request: Request, model: type[T], max_image_bytes: int,
                     multipart: bool = True) -> tuple[T, bytes | None]:
    """JSON body, or (``multipart``) multipart with an ``image`` file and the other fields -> (validated model,
    image bytes).

    Validation problems become 422 naming the field (malformed JSON included), never a 500. The offending input
    is not echoed back: it may be megabytes of base64, or NaN, inf or undecodable bytes that JSON cannot carry.
    """
    media = media_type(request)
    try:
        if media == "multipart/form-data" and multipart:
            return await parse_multipart(request, model, max_image_bytes)
        if media and media != "application/json" and not media.endswith("+json"):
            accepted = "application/json or multipart/form-data" if multipart else "application/json"
            raise HTTPException(415, f"send {accepted}, not '{clip(media, 60)}'")
        raw = await request.body()
        if not raw.strip():
            raise HTTPException(422, 'the request body is empty: send a JSON object, e.g. {"query": "a red circle"}')
        return model.model_validate_json(raw), None
    except ValidationError as exc:
        raise as_request_error(exc) from None


def as_request_error(exc: ValidationError) -> RequestValidationError:
    """pydantic's errors located in the body, without the input (the app's handler words them as one line)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])


async def parse_multipart(request: Request, model: type[T], max_image_bytes: int) -> tuple[T, bytes | None]:
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except Exception as exc:  # Starlette's HTTPException, or another type from the parser, for a broken body
        reason = exc.detail if isinstance(exc, HTTPException) else exc
        raise HTTPException(422, f"malformed multipart body ({clip(str(reason), 200)}); send multipart/form-data "
                                 f"with a boundary, complete parts, at most one file and {MAX_FORM_FIELDS} fields, "
                                 f"each under {MAX_FIELD_BYTES} bytes") from None
    upload, texts = None, []
    for key, value in form.multi_items():
        if not isinstance(value, UploadFile):
            texts.append((key, value))
        elif key != "image":
            raise HTTPException(422, f"unexpected file field '{clip(key, 60)}'; upload the query image as 'image'")
        else:
            upload = value
    fields = form_fields(model, texts)
    data = None
    if upload is not None:
        data = await upload.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise ImageRejected(413, f"'image' is more than the limit of {max_image_bytes} bytes")
    return model.model_validate(fields, context={"uploaded_image": data is not None}), data


# ------------------------------------------------------------------------------------------- form fields


def form_fields(model: type[BaseModel], items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Multipart text fields -> the dict the model validates: the ``request`` field's JSON object, and each other
    field read as its model field's kind (a list of names comma-separated, a JSON value, or text).

    A field given twice (twice as a form field, or in ``request`` and as a form field) is a 422, except a list
    field, whose values are merged. Types are left to the model: a value of the wrong type is its 422."""
    fields: dict[str, Any] = {}
    for key, value in items:
        if key == "request":
            given = load_json_field("request", value)
            if not isinstance(given, dict):
                raise HTTPException(422, "form field 'request' must be a JSON object of the other fields, e.g. "
                                         '{"query": "a red circle", "k": 5}')
            for name, field_value in given.items():
                _put(model, fields, name, field_value)
        else:
            _put(model, fields, key, read_form_value(model, key, value))
    return fields


def _put(model: type[BaseModel], fields: dict[str, Any], name: str, value: Any) -> None:
    if name not in fields:
        fields[name] = value
    elif field_kind(model, name) == TEXT_LIST:
        fields[name] = [*_as_list(fields[name]), *_as_list(value)]
    else:
        raise HTTPException(422, f"field '{clip(name, 60)}' is given twice (as form fields, or in 'request' and as "
                                 f"a form field); give it once")


def _as_list(value: Any) -> list[Any]:
    """A list field's values; any other value is one item, which the model then checks (a number: its 422)."""
    return list(value) if isinstance(value, list) else [value]


def read_form_value(model: type[BaseModel], name: str, text: str) -> Any:
    """One form field's text as its model field's kind."""
    kind = field_kind(model, name)
    if kind == TEXT_LIST:
        return [part for part in text.split(",") if part.strip()]
    if kind == JSON_VALUE:
        return load_json_field(name, text)
    return text


def field_kind(model: type[BaseModel], name: str) -> str:
    """How a form field is written: a list of names (``rerank``, ``labels``) as a comma-separated list, another
    list, a dict or an object (``filters``, ``vector``, ``sparse``) as JSON, anything else as plain text (the
    model converts "5" to 5). An unknown name is text: the model refuses it by name."""
    return _kinds(model).get(name, TEXT)


@cache
def _kinds(model: type[BaseModel]) -> dict[str, str]:
    """Each field's kind, worked out once per model (never per client-given name: the cache stays bounded)."""
    return {name: _kind(field.annotation) for name, field in model.model_fields.items()}


def _kind(annotation: Any) -> str:
    annotation = _strip_optional(annotation)
    origin = get_origin(annotation)
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return TEXT_LIST if item is str or get_origin(item) is Literal else JSON_VALUE
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return JSON_VALUE
    return TEXT


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


# --------------------------------------------------------------------------------------------- bounded JSON


def load_json_field(name: str, text: str) -> Any:
    """JSON text of one form field, bounded: at most MAX_FIELD_BYTES characters and MAX_JSON_DEPTH levels deep,
    finite numbers only; anything else a 422 naming the field and the fix (a RecursionError from ``json.loads``
    included: the depth is checked again on the parsed value, so nothing deeper reaches the model)."""
    if len(text) > MAX_FIELD_BYTES:
        raise HTTPException(413, f"form field '{clip(name, 60)}' is over {MAX_FIELD_BYTES} characters; send less")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _too_deep(name) from None
    except ValueError as exc:  # JSONDecodeError, a huge integer, NaN / Infinity / 1e309
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise HTTPException(422, f"form field '{clip(name, 60)}' is not valid JSON ({clip(reason, 120)}); send a "
                                 f"JSON value, e.g. {_example(name)}") from None
    if json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise _too_deep(name)
    return value


def _too_deep(name: str) -> HTTPException:
    return HTTPException(422, f"form field '{clip(name, 60)}' nests deeper than {MAX_JSON_DEPTH} levels; send a "
                              f"flat JSON value, e.g. {_example(name)}")


def _example(name: str) -> str:
    return '{"colour": "red", "year": {"gte": 2020}}' if name == "filters" else '{"query": "a red circle", "k": 5}'


def _no_constant(token: str) -> float:
    raise ValueError(f"{token} is not a JSON number; send a finite number")


def _finite(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{clip(token, 30)} is out of range; send a finite number")
    return value


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counted without recursion and only up to
    ``limit + 1``: the walk stops there, so its cost is bounded by the value's size."""
    deepest, level = 0, [value]
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        deepest += 1
        if deepest > limit:
            break
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return deepest


# ------------------------------------------------------------------------------------------ error answers


def validation_answer(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 body for validation errors: ``detail`` is one line naming the first bad field and what it should
    be; ``errors`` lists at most MAX_ERRORS_SHOWN of them (type, location, message), each input echoed only as a
    short prefix, so the answer stays small whatever was sent (a 100 KB parameter, a vector of 8,192 strings)."""
    shown = [_public_error(error) for error in list(errors)[:MAX_ERRORS_SHOWN]]
    if not shown:
        return {"detail": "the request is not valid", "errors": []}
    line = f"{_where(shown[0]['loc'])}: {shown[0]['msg']}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''}: see 'errors')"
    return {"detail": line, "errors": shown}


def _public_error(error: Mapping[str, Any]) -> dict[str, Any]:
    loc = [part if isinstance(part, int) else clip(str(part), 40) for part in list(error.get("loc", ()))[:8]]
    message = str(error.get("msg", "not valid")).removeprefix("Value error, ")
    public = {"type": str(error.get("type", "invalid")), "loc": loc, "msg": clip(message, 300)}
    if "input" in error and (echo := _echo(error["input"])) is not None:
        public["input"] = echo
    return public


def _echo(value: Any) -> str | int | float | bool | None:
    """A scalar input as it may be shown (text as a short prefix); a container, bytes or inf/NaN not at all."""
    if isinstance(value, str):
        return clip(value, ECHO_CHARS)
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 10**15):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _where(loc: Sequence[Any]) -> str:
    """``["body", "filters", "colour"]`` -> "field 'filters.colour'"; ``["query", "size"]`` -> "query parameter
    'size'"."""
    kind, path = (loc[0], loc[1:]) if loc and loc[0] in _PLACES else ("body", loc)
    dotted = ".".join(str(part) for part in path)
    return _PLACES[kind].format(dotted) if dotted else "the request body"


_PLACES = {"body": "field '{}'", "query": "query parameter '{}'", "path": "path parameter '{}'",
           "header": "header '{}'", "cookie": "cookie '{}'"}
