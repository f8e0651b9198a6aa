"""Fuzz the whole HTTP API from its own OpenAPI schema: never a 5xx, responses match the schema.

BOOMERANG_FUZZ_EXAMPLES sets examples per operation (CI default 25; a longer run: 500).
"""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.conftest import LiveServer

EXAMPLES = int(os.environ.get("BOOMERANG_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(llama_pair):
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        max_tokens_default=4, request_timeout_s=30)
    with LiveServer(create_app(settings)) as live:
        yield live


def _fuzz_operation(operation, ran: dict[str, int]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    def fuzz(case):
        ran[label] = ran.get(label, 0) + 1
        # A schema-valid request may still be refused for its context length or limits: that is a 400, by design.
        case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

    fuzz()


def test_no_server_errors_and_schema_conformance(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    ran: dict[str, int] = {}
    for operation in operations:
        _fuzz_operation(operation, ran)
    print(f"fuzz cases run: {sum(ran.values())} over {len(ran)} operations")
    assert len(ran) == len(operations)
