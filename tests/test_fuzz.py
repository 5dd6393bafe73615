"""Property-based fuzzing of the HTTP API from its published /openapi.json (schemathesis).

Every operation gets schema-valid (positive) and schema-invalid (negative) requests; no
answer may be a 5xx, and every answer must match the document (status listed, content
type, body schema, invalid input refused with a 4xx). `positive_data_acceptance` is left
out: the schema cannot say "exactly 4 finite features", so a schema-valid `[[1e308]]`
is rightly a 422. Examples are bounded and derandomized: the run is short and a failure
is reproducible.

(schemathesis' own pytest plugin, `from_fixture`, does not work with pytest 9 yet, so
the operations are driven here with its Python API and Hypothesis directly.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serve_app.serving.http.openapi import openapi_document

pytestmark = pytest.mark.ray

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}

# /predict/stream takes NDJSON, a text body: send it the way schemathesis sends text/plain.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")


def _has_invalid_input(item: dict[str, Any], operation: dict[str, Any]) -> bool:
    """Whether any input can break the schema: a body, or a parameter narrower than
    "any string" (every string is a valid `{name}`, so negative mode has nothing to send)."""
    parameters = list(item.get("parameters", [])) + list(operation.get("parameters", []))
    return bool(operation.get("requestBody")) or any(p.get("schema") != {"type": "string"} for p in parameters)


# (method, path, mode)
OPERATIONS = [
    (method.upper(), path, mode)
    for path, item in openapi_document("iris")["paths"].items()
    for method, operation in item.items()
    if method != "parameters"
    for mode in EXAMPLES
    if mode is GenerationMode.POSITIVE or _has_invalid_input(item, operation)
    # A stream's body is any text: a bad line is answered in-stream with {"error", "line"}
    # under a 200 (tests/test_streaming.py), so there is no schema-invalid body to refuse.
    if not (path == "/predict/stream" and mode is GenerationMode.NEGATIVE)
]


@pytest.fixture(scope="module")
def api_schema(served: dict[str, Any]) -> Any:
    return schemathesis.openapi.from_url(f"{served['base_url']}/openapi.json", timeout=30)


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS, ids=[f"{m} {p} {mode}" for m, p, mode in OPERATIONS])
def test_api_matches_its_openapi_document(api_schema: Any, served: dict[str, Any], method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,  # no .hypothesis/ directory in the repository
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=served["base_url"], timeout=30, excluded_checks=[positive_data_acceptance])
        calls.append(response.status_code)

    run()
    assert calls, "no request was sent"
    assert max(calls) < 500
