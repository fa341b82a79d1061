"""HTTP helpers shared by every domain's routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Response
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter

from billing.errors import ErrorBody
from billing.idempotency import HEADER, Outcome

# The header on every money-moving POST (SPEC §7).
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name=HEADER, required=False, description="Required: a retry with the same key is safe."),
]

_DESCRIPTIONS = {
    400: "Invalid request (bad JSON, field, money format, missing Idempotency-Key)",
    401: "Missing or invalid bearer token",
    402: "Not enough credits",
    403: "Token lacks the scope",
    404: "Not found (or not visible to this token)",
    409: "Conflict (idempotency key reused with another body, or external_id of another kind)",
    429: "Rate limited",
    503: "Not ready",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        status: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[status], generate_examples=False)
        for status in statuses
    }


def already_there(model: type, description: str) -> dict[int, ResponseSpec]:
    """The 200 of an idempotent create that found what it would have made (its 201 is the route's own)."""
    return {200: ResponseSpec(data_container=model, description=description, generate_examples=False)}


def money_response(outcome: Outcome) -> Response[Any]:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return Response(outcome.body, status_code=outcome.status, headers=headers)
