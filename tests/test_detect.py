"""The watermark detectors: valid p-values under the null (uniform: a Kolmogorov-Smirnov test over keys), the
de-duplication that makes them valid, power against radioactive suspects (open weights and through an API), the
`detect` command and the game's detectability axis."""

import functools
import json
import math

import numpy as np
import pytest
import torch

from distillarena.defenses.policy import build_policy
from distillarena.defenses.spec import defense_label
from distillarena.defenses.watermark import WatermarkScheme, binomial_tail
from distillarena.forensics import detect_api, detect_open, detect_text, encode_texts
from distillarena.tasks.arithmetic import ArithmeticTask
from distillarena.tasks.data import problem_example


def ks_uniform(ps) -> float:
    """The p-value of the one-sample Kolmogorov-Smirnov test of ``ps`` against U(0, 1) (Kolmogorov's asymptotic
    distribution with Stephens' small-sample correction)."""
    x = np.sort(np.asarray(ps, dtype=np.float64))
    n = len(x)
    d = max(float(np.max(np.arange(1, n + 1) / n - x)), float(np.max(x - np.arange(n) / n)))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return float(min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam)
                                           for k in range(1, 101)))))


def test_ks_helper():
    rng = np.random.default_rng(0)
    assert ks_uniform(rng.uniform(size=400)) > 0.01
    assert ks_uniform(rng.uniform(size=400) ** 2) < 1e-6


@functools.lru_cache(maxsize=8)
def reference_texts(n: int, ops=(2, 3), seed: int = 3) -> list[tuple[str, str]]:
    problems = ArithmeticTask().problems("test", n, list(ops), seed=seed)
    return [(ex.prompt, ex.completion) for ex in (problem_example(p) for p in problems)]


@pytest.fixture(scope="module")
def clean_texts(task_tok):
    return encode_texts(task_tok, reference_texts(300))


def test_text_detector_null_p_values_are_uniform(task_tok, clean_texts):
    # unwatermarked text, 150 keys (and several green fractions and windows): p-values uniform, no false accusation
    ps = []
    for i in range(150):
        scheme = WatermarkScheme(f"key-{i}", gamma=(0.25, 0.5)[i % 2], context=(2, 3, 4)[i % 3])
        det = detect_text(scheme, task_tok, clean_texts, examples=0)
        assert det.scored > 500 and det.duplicates > 0  # arithmetic text repeats pairs
        ps.append(det.p_value)
    assert ks_uniform(ps) > 0.01
    for alpha in (0.01, 0.05, 0.1):  # and never anti-conservative beyond chance (binomial 4-sigma bound)
        assert np.mean(np.array(ps) <= alpha) <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / len(ps))


def test_entropy_gated_text_detector_null_and_power(tiny_teacher, task_tok, clean_texts):
    # the gate (the teacher's entropy before each position) cannot select by the key: still uniform under the null
    from distillarena.models.presets import load_model

    model = load_model(str(tiny_teacher))
    texts = clean_texts[:150]
    ps = []
    for i in range(40):
        det = detect_text(WatermarkScheme(f"gate-{i}", 0.5, 3), task_tok, texts, model=model, min_entropy=5.0,
                          examples=0)
        assert 0 < det.low_entropy < det.positions
        ps.append(det.p_value)
    assert ks_uniform(ps) > 0.01
    # (its power shows on a trained teacher, whose entropy is near 0 on most tokens: bench/bench_radioactivity.py)
    marked = watermarked_samples(model, task_tok, "g", n=32)
    gated = detect_text(WatermarkScheme("g", 0.5, 2), task_tok, marked, model=model, min_entropy=5.0)
    assert gated.low_entropy > 0 and gated.p_value < 1e-3


def test_without_deduplication_a_clean_text_is_falsely_accused(clean_texts):
    # counting every position (a repeated pair is the same coin read again) inflates the variance of the count
    ps = []
    for i in range(60):
        scheme = WatermarkScheme(f"key-{i}", gamma=0.5, context=2)
        n = g = 0
        for ids, start in clean_texts:
            for t in range(start, len(ids)):
                n += 1
                g += scheme.is_green(scheme.window(ids, t), ids[t])
        ps.append(binomial_tail(g, n, 0.5)[0])
    assert np.mean(np.array(ps) < 0.01) > 0.2 and ks_uniform(ps) < 1e-6


class Radioactive(torch.nn.Module):
    """A perfectly radioactive suspect: ``model``'s logits plus ``delta`` on the green list of every position's
    window (what a student that learned the watermarked teacher exactly would predict)."""

    def __init__(self, model, scheme: WatermarkScheme, delta: float):
        super().__init__()
        self.model, self.scheme, self.delta = model, scheme, delta

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits.clone()
        v = logits.shape[-1]
        for b, row in enumerate(input_ids.tolist()):
            for i in range(len(row)):
                w = self.scheme.window(row, i + 1)
                logits[b, i] += self.delta * torch.from_numpy(self.scheme.green_mask(w, v)).float()
        out.logits = logits
        return out


def watermarked_samples(model, tok, key: str, n: int = 48, delta: float = 4.0, context: int = 2, seed: int = 0):
    from distillarena.models.tokenizer import left_padding

    prompts = [p for p, _ in reference_texts(n)]
    policy = build_policy("watermark", {"delta": delta, "key": key, "context": context})
    with left_padding(tok):
        enc = tok(prompts, return_tensors="pt", padding=True)
    res = policy.sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=20,
                        generator=torch.Generator().manual_seed(seed), eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    return list(zip(prompts, res.texts(tok), strict=True))


def test_open_weights_null_reading_watermarked_text_is_uniform(tiny_teacher, task_tok):
    # the hardest null: the suspect is the very model that wrote the texts (never trained on them), and it reads its
    # own watermarked outputs. Its predictions follow the text, yet a window is scored only where it is new in the
    # input, so what it predicts there cannot depend on that window's green list
    from distillarena.models.presets import load_model

    model = load_model(str(tiny_teacher))
    ps = []
    for i in range(40):
        key = f"wm-{i}"
        texts = watermarked_samples(model, task_tok, key, n=32, seed=i)
        assert detect_text(WatermarkScheme(key, 0.5, 2), task_tok, texts).p_value < 1e-3  # the texts are marked
        det = detect_open(WatermarkScheme(key, 0.5, 2), model, task_tok, texts, examples=0)
        assert det.repeated_window > 0 and det.scored > 50
        ps.append(det.p_value)
    assert ks_uniform(ps) > 0.01
    assert np.mean(np.array(ps) < 0.05) <= 0.05 + 4 * math.sqrt(0.05 * 0.95 / len(ps))


def test_open_weights_detects_a_radioactive_suspect(tiny_teacher, task_tok):
    from distillarena.models.presets import load_model

    model = load_model(str(tiny_teacher))
    scheme = WatermarkScheme("k", 0.5, 2)
    texts = reference_texts(64)
    hot = detect_open(scheme, Radioactive(model, scheme, 3.0), task_tok, texts)
    assert hot.p_value < 1e-6 and hot.green_fraction > 0.6 and hot.z > 5
    assert detect_open(WatermarkScheme("not-k", 0.5, 2), Radioactive(model, scheme, 3.0), task_tok,
                       texts).p_value > 1e-3
    # the entropy floor skips positions where the suspect is sure (here: all of them)
    filtered = detect_open(scheme, Radioactive(model, scheme, 3.0), task_tok, texts, min_entropy=1e9)
    assert filtered.scored == 0 and filtered.p_value == 1.0
    assert filtered.low_entropy == hot.positions - hot.repeated_window
    assert "p-value" in hot.lines()[0] and hot.as_dict()["scored"] == hot.scored


def test_api_detection_against_a_served_model(tiny_teacher, task_tok, tmp_path):
    # the suspect behind an API: a served model whose key policy is the watermark (a perfectly radioactive
    # student), and the same model unwatermarked
    from distillarena.serve.config import PolicyConfig, ServeConfig
    from distillarena.serve.testing import running_server
    from distillarena.teachers.api_client import APITeacher

    cfg = ServeConfig(model=str(tiny_teacher), model_name="suspect", store=str(tmp_path / "s.sqlite"), port=0)
    prompts = [p for p, _ in reference_texts(48)]
    scheme = WatermarkScheme("k", 0.5, 2)
    with running_server(cfg) as srv:
        marked, _ = srv.store.create_key("wm", policy=PolicyConfig(defense="watermark",
                                                                   params={"delta": 4.0, "key": "k", "context": 2}))
        clean, _ = srv.store.create_key("clean")
        out = {}
        for name, token in (("marked", marked), ("clean", clean)):
            client = APITeacher(base_url=srv.base_url, api_key=token, model="suspect", chat=False, max_tokens=20,
                                temperature=1.0, top_logprobs=None, seed=0, concurrency=2)
            out[name] = detect_api(scheme, client, task_tok, prompts, out=tmp_path / f"{name}.jsonl")
    assert out["marked"].mode == "api" and out["marked"].texts == 48
    assert out["marked"].p_value < 1e-4 and out["clean"].p_value > 1e-3
    assert (tmp_path / "marked.jsonl").is_file()  # the evidence is kept


def test_detect_command(tiny_teacher, task_tok, tmp_path, capsys):
    from distillarena.cli import main
    from distillarena.models.presets import load_model

    texts = watermarked_samples(load_model(str(tiny_teacher)), task_tok, "cli-key", n=32)
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in texts))
    assert main(["detect", "--texts", str(path), "--key", "cli-key", "--context", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mode"] == "text" and res["p_value"] < 1e-3 and res["examples"]
    assert main(["detect", "--suspect", str(tiny_teacher), "--key", "cli-key", "--context", "2", "--n", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("p-value") and "distinct (window, token) pairs" in printed
    assert main(["detect", "--texts", str(path), "--key", "cli-key", "--context", "2", "--teacher", str(tiny_teacher),
                 "--min-entropy", "5.0"]) == 0
    assert "below the entropy floor" in capsys.readouterr().out
    assert main(["detect", "--texts", str(path), "--key", "k", "--min-entropy", "0.5"]) == 2  # a gate needs a model
    assert "--teacher" in capsys.readouterr().err
    assert main(["detect", "--texts", str(path)]) == 2  # no key
    assert "--key" in capsys.readouterr().err
    assert main(["detect", "--suspect", str(tmp_path / "nowhere"), "--key", "k"]) == 2
    assert main(["detect", "--key", "k", "--gamma", "1.5", "--texts", str(path)]) == 2
    assert "gamma" in capsys.readouterr().err


# --- the game's third axis -------------------------------------------------------------------------------------


def test_game_detectability_axis(task_tok, tmp_path):
    from distillarena.game import sweep
    from distillarena.game.config import GameConfig
    from distillarena.game.detect import ALPHA, detectability_rows, detection_params
    from distillarena.models.presets import build_preset

    paths = {}
    for name, preset, seed in (("teacher", "small", 0), ("student", "tiny", 1)):
        build_preset(preset, task_tok, seed=seed).save_pretrained(tmp_path / name)
        task_tok.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    cfg = GameConfig.model_validate({
        "teacher": {"path": paths["teacher"]}, "student": {"path": paths["student"]},
        "defenses": [{"kind": "watermark", "strengths": [{"delta": 4.0, "key": "game-key"}]}],
        "attackers": [{"kind": "passive"}], "seeds": [0], "budget": 8, "prompts": {"pool": 8, "n_ops": [1]},
        "holdout": 4, "max_new_tokens": 10, "batch_size": 8, "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
        "eval": {"n_problems": 3, "difficulties": [1], "max_new_tokens": 10, "entropy_problems": 0},
        "oracle": {"n_traces": 0}})
    assert detection_params(cfg) == {"key": "game-key", "gamma": 0.5, "context": 4}
    summary = sweep.run_game(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # every student tested against the game's one scheme
        assert r["detect"]["scheme"]["context"] == 4 and 0 <= r["detect_p_value"] <= 1 and r["detect"]["scored"] > 0
        assert "game-key" not in json.dumps(r["detect"])  # the secret is not written into the results
    det = summary["detectability"]
    wm_label = defense_label("watermark", {"delta": 4.0, "key": "game-key"})
    assert {d["defense_label"] for d in det} == {"none", wm_label} and "game-key" not in wm_label
    assert all(d["tested"] == 1 and len(d["p_values"]) == 1 for d in det)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Detectability" in html and f"p &lt; {ALPHA:g}" in html
    assert "game-key" not in html  # labels show a digest of the secret key, never the key
    # a config testing another scheme shows no stale p-value
    other = cfg.model_copy(update={"defenses": [cfg.defenses[0].model_copy(update={"strengths": [
        {"delta": 4.0, "key": "game-key", "context": 2}]})]})
    stale = detectability_rows(other, rows)
    assert all(d["tested"] == 0 for d in stale if d["defense_label"] == "none")


def test_scrub_attacker_launders_watermarked_traces_and_never_sees_the_key(tiny_teacher, task_tok):
    """The paraphrasing attack on a watermark: the student rewrites every reasoning line itself, so the text it
    trains on no longer carries the green-list bias; and the attacker's view holds a digest of the key, not the key."""
    import functools

    from distillarena.attacks.plan import AttackContext, attacker_view
    from distillarena.attacks.scrub import plan as scrub_plan
    from distillarena.attacks.spec import ScrubParams
    from distillarena.defenses.paraphrase import paraphrase_lines
    from distillarena.game.attack import _public_view
    from distillarena.game.config import DefenseConfig, GameConfig
    from distillarena.models.presets import build_preset, load_model

    teacher = load_model(str(tiny_teacher))
    scheme = WatermarkScheme("scrub-key", 0.5, 2)
    marked = watermarked_samples(teacher, task_tok, "scrub-key", n=48, delta=4.0, context=2)
    assert detect_text(scheme, task_tok, marked).p_value < 1e-4
    records = [{"index": i, "prompt": p, "completion": c, "tokens": [], "defense": "watermark",
                "params": {"delta": 4.0, "key": "scrub-key", "context": 2}} for i, (p, c) in enumerate(marked)]
    view = [_public_view(r) for r in records]
    assert "scrub-key" not in json.dumps(view) and view[0]["params"]["key"].startswith("sha256:")
    student = build_preset("tiny", task_tok, seed=7)
    ctx = AttackContext(records=[attacker_view(r) for r in view], encoded=[], topk=None, student=student,
                        tokenizer=task_tok, pad_id=task_tok.pad_token_id, task=ArithmeticTask(), problems=[],
                        defense=DefenseConfig(), sampling={}, cfg=GameConfig(), seed=0, objective="sft",
                        holdout=lambda source: [], load_model=lambda ref: None, budget=len(records),
                        paraphrase=functools.partial(paraphrase_lines, task=ArithmeticTask()))
    before = [p.detach().clone() for p in student.parameters()]
    plan = scrub_plan(ctx, ScrubParams(strength=1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))  # weights as found
    assert plan.keep == list(range(len(records))) and plan.info["scrubbed_traces"] == len(plan.replace) > 30
    laundered = [(p, plan.replace[i].completion if i in plan.replace else c) for i, (p, c) in enumerate(marked)]
    assert detect_text(scheme, task_tok, laundered).p_value > 1e-3
