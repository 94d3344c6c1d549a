"""OpenAI ``response_format`` and vLLM's ``structured_outputs`` -> `StructuredOutputsParams`.

Accepted on both /v1/chat/completions and /v1/completions (as vLLM does):
- ``response_format: {"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON
  object), ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- the vLLM extension ``structured_outputs: {"json": schema} | {"regex": ...} | {"choice": [...]} |
  {"grammar": ebnf} | {"json_object": true}``, with optional ``disable_any_whitespace``.
"""

from __future__ import annotations

from typing import Any

from deploy.errors import APIError
from vattn_ray.sampling_params import StructuredOutputsParams

_STRUCTURED_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "disable_any_whitespace")


def structured_outputs(response_format: dict[str, Any] | None,
                       extension: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """The request's output constraint, or None; APIError (400) naming the field when malformed."""
    if response_format and extension:
        raise APIError("set either response_format or structured_outputs, not both", param="response_format")
    if extension:
        unknown = sorted(set(extension) - set(_STRUCTURED_FIELDS))
        if unknown:
            raise APIError(f"structured_outputs has unsupported field(s) {unknown}; supported: "
                           f"{list(_STRUCTURED_FIELDS)}", param="structured_outputs")
        try:
            return StructuredOutputsParams(**extension)
        except (TypeError, ValueError) as exc:
            raise APIError(str(exc), param="structured_outputs") from exc
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError('response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                           '"schema": {...}} with the schema as an object', param="response_format")
        try:
            return StructuredOutputsParams(json=schema)
        except ValueError as exc:
            raise APIError(str(exc), param="response_format") from exc
    raise APIError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                   "'json_schema'", param="response_format")
