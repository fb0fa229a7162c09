"""Every Python snippet of the README runs: with a tiny model in place of SmolLM2, a local ``distillarena serve`` in
place of the documented address, and two training steps instead of the documented count."""

import re
from pathlib import Path

import pytest

from distillarena.serve.config import PolicyConfig, ServeConfig
from distillarena.serve.testing import running_server

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("readme")
    cfg = ServeConfig(model=str(tiny_teacher), model_name="teacher", store=str(root / "s.sqlite"), port=0,
                      max_tokens_cap=32)
    with running_server(cfg) as srv:
        yield srv


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, server, tiny_teacher, task_tok, tmp_path, monkeypatch):
    pytest.importorskip("openai")
    code = SNIPPETS[index]
    if "trl" in code:
        pytest.importorskip("trl")
        monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    for real, stand_in in (("HuggingFaceTB/SmolLM2-135M-Instruct", str(tiny_teacher)),
                           ("http://127.0.0.1:8000/v1", server.base_url),
                           ('"steps": 200', '"steps": 2')):
        code = code.replace(real, stand_in)
    token, _ = server.store.create_key(f"readme-{index}", policy=PolicyConfig(max_top_logprobs=5))
    monkeypatch.setenv("OPENAI_API_KEY", token)
    monkeypatch.chdir(tmp_path)  # runs/... are written here
    namespace = {"__name__": f"readme_snippet_{index}", "token": token,
                 "ids": task_tok("12+34=")["input_ids"]}
    exec(compile(code, f"README.md python snippet {index}", "exec"), namespace)
