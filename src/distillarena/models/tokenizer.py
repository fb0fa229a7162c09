"""The built-in world's tokenizers: byte-level BPEs trained locally with ``tokenizers``.

:func:`task_tokenizer` (the default): each digit is its own token, so the models do arithmetic on digits, not on
arbitrary number chunks. Byte-level, so any text encodes and decodes exactly (no unknown token). It is trained
on a seeded corpus of the arithmetic task and wrapped as a ``PreTrainedTokenizerFast``, so ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` work with no project code. Training is deterministic and takes well under a
second; the result is cached on disk by the hash of its recipe.

:func:`merged_digits_tokenizer`: a second tokenizer for the same world, so that a teacher and a student that do
not share a vocabulary can be tried offline. Numbers are *not* split into digits (``37`` and `` 37`` are single
tokens), the corpus has another seed, the vocabulary another size (about 500), and the special tokens (same
strings) come after the learned ones instead of first, so every shared string has another id.

Both are named in configs as ``builtin:task`` and ``builtin:merged-digits`` (:data:`BUILTIN_TOKENIZERS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, cache_dir
from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

EOS = "<|endoftext|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT]
TASK_VOCAB_SIZE = 384
CORPUS_SEED = 1234
CORPUS_SIZE = 20_000
# A minimal chat template, so chat-format (``messages``) data works with the built-in tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS + ""
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def _corpus() -> list[str]:
    task = ArithmeticTask(ArithmeticConfig(word_fraction=0.3))
    rng = random.Random(CORPUS_SEED)
    lines = []
    for i in range(CORPUS_SIZE):
        p = task.sample(rng, 1 + i % 4)
        lines.append(p.prompt + p.random_solution(rng))
    return lines


def _recipe_hash() -> str:
    recipe = {"task": dataclasses.asdict(ArithmeticConfig(word_fraction=0.3)), "vocab": TASK_VOCAB_SIZE,
              "seed": CORPUS_SEED, "n": CORPUS_SIZE, "special": SPECIAL_TOKENS,
              "template": CHAT_TEMPLATE, "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def train_task_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the task corpus and wrap it (no caching)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TASK_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; training code pads explicitly
    return fast


def _cached_tokenizer(name: str, train: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """The tokenizer cached as ``<cache>/tokenizers/<name>`` (the name carries its recipe's hash), trained first if
    it is not there yet."""
    path = cache_dir() / "tokenizers" / name
    if not (path / "tokenizer.json").exists():
        with atomic_dir(path) as tmp:
            train().save_pretrained(tmp)
    from distillarena.models.hub import no_hub_probes

    with no_hub_probes(True):
        return PreTrainedTokenizerFast.from_pretrained(str(path))


def task_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in tokenizer, trained once and then loaded from the cache."""
    return _cached_tokenizer(f"arith-{_recipe_hash()}", train_task_tokenizer)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))


MERGED_VOCAB_SIZE = 512
MERGED_CORPUS_SEED = 4321


def _merged_recipe_hash() -> str:
    recipe = {"task": dataclasses.asdict(ArithmeticConfig(word_fraction=0.3)), "vocab": MERGED_VOCAB_SIZE,
              "seed": MERGED_CORPUS_SEED, "n": CORPUS_SIZE, "special": SPECIAL_TOKENS, "template": CHAT_TEMPLATE,
              "kind": "merged-digits", "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def train_merged_digits_tokenizer() -> PreTrainedTokenizerFast:
    """Train the second built-in tokenizer (numbers merge into multi-digit tokens; specials last); no caching."""
    task = ArithmeticTask(ArithmeticConfig(word_fraction=0.3))
    rng = random.Random(MERGED_CORPUS_SEED)
    lines = []
    for i in range(CORPUS_SIZE):
        p = task.sample(rng, 1 + i % 4)
        lines.append(p.prompt + p.random_solution(rng))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MERGED_VOCAB_SIZE, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def merged_digits_tokenizer() -> PreTrainedTokenizerFast:
    """The second built-in tokenizer, trained once and then loaded from the cache."""
    return _cached_tokenizer(f"arith-merged-{_merged_recipe_hash()}", train_merged_digits_tokenizer)


BUILTIN_PREFIX = "builtin:"
BUILTIN_TOKENIZERS = {"task": task_tokenizer, "merged-digits": merged_digits_tokenizer}


def builtin_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A built-in tokenizer by name (``task`` or ``merged-digits``, with or without the ``builtin:`` prefix)."""
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_TOKENIZERS:
        raise UserError(f"unknown built-in tokenizer {name!r}; available: "
                        f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_TOKENIZERS)}")
    return BUILTIN_TOKENIZERS[key]()


@contextlib.contextmanager
def left_padding(tokenizer):
    """Pad on the left while the block runs (batched generation needs every prompt to end at the last column),
    then restore the tokenizer's own side."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table: the character a byte-level BPE token uses for each byte
    (printable bytes map to themselves, the rest to 256 and up), back to the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
