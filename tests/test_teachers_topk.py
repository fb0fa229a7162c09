"""The top-k teacher cache: codec round trips, the cache round trip against the live teacher, size and quality
numbers, and corruption detection."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillarena.core.errors import UserError
from distillarena.models.presets import load_model
from distillarena.objectives.signals import topk_token_logprobs
from distillarena.tasks.data import arithmetic_examples, collate, encode_example
from distillarena.teachers import LocalTeacher, TopKCache, TopKCodec, build_topk_cache, cached_kl


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5000), st.data())
def test_id_codec_round_trips(vocab, data):
    k = data.draw(st.integers(1, min(vocab, 300)))
    codec = TopKCodec(vocab, k)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    ids = np.sort(np.stack([rng.choice(vocab, k, replace=False) for _ in range(5)]), axis=1)
    codes = codec.encode_ids(ids)
    assert codes.shape == (5, codec.id_bytes)
    np.testing.assert_array_equal(codec.decode_ids(codes), ids)
    # never more than the bitmask, and about k * (2 + log2(V / k)) bits with Elias-Fano
    assert codec.id_bytes <= math.ceil(vocab / 8)
    assert codec.id_bytes * 8 <= k * (2 + max(0.0, math.log2(vocab / k))) + 16


@pytest.mark.parametrize("bits", [8, 16])
def test_logprob_codec_error_shrinks_with_probability(bits):
    codec = TopKCodec(1000, 64, bits)
    lps = torch.log_softmax(torch.randn(200, 1000) * 4, -1)
    top, ids = lps.topk(64, -1)
    tail = torch.logsumexp(lps.scatter(-1, ids, float("-inf")), -1)
    enc = codec.encode(ids, top, tail)
    ids2, top2, tail2 = codec.decode(enc["id_codes"], enc["lp_codes"], enc["tail"])
    order = ids.argsort(-1)
    p = top.gather(-1, order).exp()
    err = (top2 - top.gather(-1, order)).abs()
    big = p > 0.05
    assert float(err[big].max()) < (0.04 if bits == 8 else 2e-3)  # relative error of the likely tokens
    # a proper (k + 1)-bucket distribution, every value finite
    total = torch.logsumexp(torch.cat([top2, tail2[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros(200), atol=1e-5, rtol=0)
    assert torch.isfinite(top2).all()
    # with k = V (no tail) the KL to the full distribution is the quantization's alone
    full = TopKCodec(1000, 1000, bits)
    lp_all, ids_all = lps.topk(1000, -1)
    enc = full.encode(ids_all, lp_all, torch.full((200,), float("-inf")))
    kl = cached_kl(lps, *full.decode(enc["id_codes"], enc["lp_codes"], enc["tail"]))
    assert float(kl.mean()) < (3e-4 if bits == 8 else 1e-6)


def test_topk_token_logprobs_inside_and_outside():
    ids = torch.tensor([[3, 7]])
    lps = torch.log(torch.tensor([[0.5, 0.3]]))
    tail = torch.log(torch.tensor([0.2]))
    got = topk_token_logprobs(ids, lps, tail, torch.tensor([7]), vocab_size=12)
    torch.testing.assert_close(got, torch.log(torch.tensor([0.3])))
    got = topk_token_logprobs(ids, lps, tail, torch.tensor([5]), vocab_size=12)
    torch.testing.assert_close(got, torch.log(torch.tensor([0.2 / 10])))


@pytest.fixture(scope="module")
def built(tiny_teacher, task_tok, tmp_path_factory):
    model = load_model(str(tiny_teacher))
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)  # peaked like a trained teacher: little mass beyond the top 128
    teacher = LocalTeacher(model, task_tok)
    enc = [encode_example(task_tok, e) for e in arithmetic_examples("train", 10, [1, 2, 3], seed=7)]
    path = tmp_path_factory.mktemp("topk") / "cache"
    stats = build_topk_cache(path, teacher, enc, weights=[1.0] * 9 + [3.0], k=128, examples_per_shard=4,
                             teacher_id="tiny")
    return teacher, enc, path, stats


def test_cache_round_trip_against_the_live_teacher(built, task_tok):
    teacher, enc, path, stats = built
    cache = TopKCache(path)
    assert cache.k == 128 and len(cache.manifest["shards"]) == 3
    assert cache.examples == [tuple(e) for e in enc] and cache.weights[-1] == 3.0
    assert stats.signal_bytes_per_token == 40 + 128 + 2  # bitmask over 316 tokens, 8-bit values, fp16 tail
    assert stats.signal_bytes_per_token <= 300 and stats.kl_mean <= 1e-3
    assert cache.stats["kl_mean"] == stats.kl_mean and cache.teacher_id == "tiny"
    batch = collate(enc[3:7], task_tok.pad_token_id)
    batch["example_index"] = torch.arange(3, 7)
    sig = cache.signal(batch)
    logits = teacher.logits(batch["input_ids"], batch["attention_mask"])[:, :-1]
    valid = batch["labels"][:, 1:] != -100
    full = torch.log_softmax(logits[valid], -1)
    want_lp, want_ids = full.topk(128, -1)
    ids, lps = sig.topk_ids[valid], sig.topk_logprobs[valid]
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
    got = lps.gather(-1, ids.argsort(-1)).exp()
    want = want_lp.gather(-1, want_ids.argsort(-1)).exp()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-2)  # 8-bit cube-root grid
    # a batch that is not the cache's data is refused, not silently misaligned
    batch["example_index"] = torch.arange(0, 4)
    with pytest.raises(UserError, match="does not match the cache"):
        cache.signal(batch)


def test_a_flipped_byte_is_detected(built, tmp_path):
    import shutil

    _, _, path, _ = built
    for target in ("shard-00001.safetensors", "manifest.json"):
        copy = tmp_path / target
        shutil.copytree(path, copy)
        f = copy / target
        raw = bytearray(f.read_bytes())
        i = len(raw) // 2 if target.endswith("safetensors") else raw.index(b'"k": 128') + 6
        raw[i] ^= 0x02
        f.write_bytes(bytes(raw))
        with pytest.raises(UserError, match="checksum|corrupted"):
            TopKCache(copy)


def test_a_missing_shard_or_foreign_folder_is_an_error(built, tmp_path):
    import shutil

    _, _, path, _ = built
    with pytest.raises(UserError, match="not a top-k teacher cache"):
        TopKCache(tmp_path)
    copy = tmp_path / "c"
    shutil.copytree(path, copy)
    (copy / "shard-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing"):
        TopKCache(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["codec"]["id_encoding"] == "bitmask"
