"""What a request becomes when it fails over to another provider. Pure.

Only what must change is rewritten (LiteLLM's and Envoy's habit): the path
prefix (``/v1/...`` to ``/openai/v1/...``), the JSON ``model`` field by the
fallback's table, and (in the forwarder) the base URL and the credential.
A fallback that cannot serve the request is skipped, never half-applied:
a path outside its ``paths``, or a model its table does not name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from proxy.policy import Fallback


@dataclass(frozen=True, slots=True)
class Rewritten:
    path: str
    body: bytes | None  # None: the body is sent unchanged
    model: str | None  # the model the fallback will be asked for, when rewritten


def rewrite(fallback: Fallback, path: str, body: object) -> Rewritten | None:
    """The request for ``fallback``, or None when it cannot take it.
    ``body`` is the request body: bytes when held, else a stream."""
    if fallback.paths and not any(path.startswith(prefix) for prefix in fallback.paths):
        return None
    new_path = path
    if fallback.rewrite_from and path.startswith(fallback.rewrite_from):
        new_path = fallback.rewrite_to + path[len(fallback.rewrite_from) :]
    if not fallback.models:
        return Rewritten(new_path, None, None)
    if not isinstance(body, bytes):
        return None  # a streamed body cannot be rewritten
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return Rewritten(new_path, None, None)  # no model to map: the body goes as it is
    model = map_model(fallback, doc["model"])
    if model is None:
        return None
    doc["model"] = model
    return Rewritten(new_path, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(), model)


def map_model(fallback: Fallback, model: str) -> str | None:
    table = dict(fallback.models)
    return table.get(model, table.get("*"))
