"""A bounded schemathesis run against the server's own OpenAPI schema: no input yields a 5xx."""

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from distillarena.serve.config import BatchingConfig, ServeConfig  # noqa: E402
from distillarena.serve.testing import running_server, save_tiny_model  # noqa: E402

EXAMPLES = 15  # per operation and generation mode: fixed, so the run is bounded


@pytest.fixture(scope="module")
def server(tmp_path_factory, task_tok):
    root = tmp_path_factory.mktemp("fuzz")
    cfg = ServeConfig(model=str(save_tiny_model(root / "teacher")), model_name="tiny", store=str(root / "s.sqlite"),
                      port=0, max_tokens_cap=8, max_n=2, max_prompts=4,
                      batching=BatchingConfig(max_batch_size=8, max_wait_ms=2))
    with running_server(cfg) as srv:
        yield srv


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("authorised", [True, False])
def test_no_input_yields_a_server_error(server, mode, authorised):
    token, _ = server.store.create_key("fuzz")
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    headers = {"Authorization": f"Bearer {token}"} if authorised else None
    failures = []
    for op in ops:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # no parameters to make invalid
        fuzz(op, op.as_strategy(generation_mode=mode, headers=headers), mode, server, failures,
             EXAMPLES if authorised else 5)
    assert not failures, failures[:3]
    counts = {}
    for row in server.store.ledger_rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    assert not any(s >= 500 for s in counts), counts
    assert counts.get(200, 0) > 0  # the valid cases reached generation, not only the validators


def fuzz(op, strategy, mode, server, failures, examples):
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"  # get past the model check, into tokenization and generation
        response = case.call(base_url=server.url, timeout=60)
        if response.status_code >= 500:
            failures.append((op.path, case.body, response.status_code, response.text[:300]))
        if response.status_code >= 400:
            body = response.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}, body

    check()
