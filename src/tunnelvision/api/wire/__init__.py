"""Other projects' wire formats <-> our engine's parameters and answers (no HTTP here)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI request body for a route that parses its JSON by hand (so that its errors keep
    the protocol's own shape)."""
    schema = model.model_json_schema()
    inline = _inlined(schema, schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline}}}}


def _inlined(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with each `$ref` to `defs` replaced by its definition (ours nest no cycles)."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inlined(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inlined(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inlined(value, defs) for value in node]
    return node
