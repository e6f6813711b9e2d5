"""schemathesis against the OpenAPI document a real ``batchd serve`` serves (issue 10).

Every operation of the ``/v1`` tree gets generated requests, both valid (positive) and invalid
(negative) ones, sent with a key; each answer must be no 5xx, a status the document lists
for the route with the body and content type it documents, a 4xx for data the document
rules out, a 405 with ``Allow`` for a method the path lacks, and a 401 without a key.
Budget: ``EXAMPLES`` requests per operation and mode, ~20 s in all on 2 cores;
``derandomize`` makes a CI run reproducible.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openai import OpenAI
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import API_KEY
from tests.support import Server, chat_lines

EXAMPLES = 25
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def operations(server: Server, client: OpenAI) -> list[Any]:
    # Something to find: a file and a batch, so that not every id is unknown.
    f = client.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
    client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # The /openai and /openai/v1 trees are the same operations on the same handlers: /v1
    # stands for them (their documents are copies of its, see api/docs.py).
    ops = [op for op in (r.ok() for r in schema.get_all_operations()) if op.path.startswith("/v1/")]
    assert len(ops) >= 9 + 5  # nine routes, five of them GETs that answer HEAD too
    return ops


def test_every_operation_answers_as_documented(operations: list[Any], server: Server) -> None:
    tried = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                # positive_data_acceptance would want a 2xx for any id the document allows;
                # an id that names nothing here is rightly a 404.
                case.call_and_validate(
                    base_url=server.url, headers=AUTH, excluded_checks=[positive_data_acceptance]
                )

            check()
            tried += 1
    assert tried == 2 * len(operations)
    assert "unhandled error" not in server.proc.output()
