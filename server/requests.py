"""Request bodies: JSON, or multipart/form-data with an ``image`` file and the other fields (as form fields or as
one JSON ``request`` field), validated into the schemas' models; a bad body is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.imaging import ImageRejected

T = TypeVar("T", bound=BaseModel)

_UPLOAD_BODY = {"content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/{name}"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"},
        "request": {"type": "string", "description": "the other fields as a JSON object"}}}},
}, "required": True}


def body_doc(name: str) -> dict:
    doc = {"required": True, "content": {k: dict(v) for k, v in _UPLOAD_BODY["content"].items()}}
    doc["content"]["application/json"] = {"schema": {"$ref": f"#/components/schemas/{name}"}}
    return doc


async def parse_body(request: Request, model: type[T], max_image_bytes: int) -> tuple[T, bytes | None]:
    """JSON body, or multipart with an ``image`` file and the other fields -> (validated model, image bytes).

    Validation problems become 422 with pydantic's messages (malformed JSON included), never a 500. The
    offending input is not echoed back: it may be megabytes of base64, or NaN, inf or undecodable bytes that
    JSON cannot carry; the location and message name the field.
    """
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            return await parse_multipart(request, model, max_image_bytes)
        if content_type and not content_type.startswith("application/json"):
            raise HTTPException(415, f"send application/json or multipart/form-data, not '{content_type}'")
        raw = await request.body()
        if not raw.strip():
            raise HTTPException(422, 'the request body is empty: send a JSON object, e.g. {"query": "a red circle"}')
        return model.model_validate_json(raw), None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc


async def parse_multipart(request: Request, model: type[T], max_image_bytes: int) -> tuple[T, bytes | None]:
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:  # the multipart parser raises several types for broken bodies
        raise HTTPException(422, f"malformed multipart body: {exc}") from exc
    fields: dict[str, Any] = {}
    upload = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "image":
                raise HTTPException(422, f"unexpected file field '{key}'; upload the query image as 'image'")
            upload = value
        elif key == "request":
            try:
                fields.update(json.loads(value))
            except (ValueError, TypeError) as exc:
                raise HTTPException(422, f"form field 'request' is not a JSON object: {exc}") from exc
        elif key in ("rerank", "labels"):
            given = fields.get(key, [])
            fields[key] = [*([given] if isinstance(given, str) else list(given)),
                           *(v for v in value.split(",") if v.strip())]
        elif key == "filters":
            try:
                fields[key] = json.loads(value)
            except ValueError as exc:
                raise HTTPException(422, f"form field 'filters' is not JSON: {exc}") from exc
        else:
            fields[key] = value
    data = None
    if upload is not None:
        data = await upload.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise ImageRejected(413, f"'image' is more than the limit of {max_image_bytes} bytes")
    return model.model_validate(fields, context={"uploaded_image": data is not None}), data
