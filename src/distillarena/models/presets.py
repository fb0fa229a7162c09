"""Model presets (Llama architecture, sized for the built-in world) and loading of any user model.

Every model is a plain Hugging Face ``LlamaForCausalLM``: a folder we save loads with
``AutoModelForCausalLM.from_pretrained`` and no project code. A hub id is downloaded unless the user set
``HF_HUB_OFFLINE`` (the ``distillarena`` command sets it to 1 by default); a local folder never touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distillarena.core.errors import UserError
from distillarena.models.hub import hub_hint, hub_offline, no_hub_probes
from distillarena.models.tokenizer import BUILTIN_PREFIX, builtin_tokenizer

# name -> (hidden, layers, heads, intermediate). Parameter counts with the built-in tokenizer (vocab 317,
# tied embeddings) are listed in the README and checked by tests.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (80, 2, 4, 256),  # ~0.2M: a proxy or a capacity-starved student
    "small": (128, 3, 4, 384),  # ~0.7M: the default student
    "base": (192, 4, 6, 768),  # ~2.4M: the default teacher
    "large": (256, 6, 8, 768),  # ~5.2M: a stronger teacher when minutes are available
}
MAX_POSITIONS = 512


def preset_config(name: str, vocab_size: int, *, eos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> LlamaConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    hidden, layers, heads, inter = PRESETS[name]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )


def build_preset(name: str, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised preset model whose vocabulary matches ``tokenizer`` exactly."""
    config = preset_config(name, len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _resolve(path_or_id: str) -> tuple[str, bool]:
    """A local folder is used as is; anything else is a hub id that must already be in the local HF cache."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model path {p} is a file; expected a save_pretrained folder")
        return str(p), True
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_local:
        raise UserError(f"model path {path_or_id} does not exist")
    return path_or_id, False


def load_model(path_or_id: str, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    """Load any causal LM by local path or hub id (downloaded unless ``HF_HUB_OFFLINE`` is set: see
    :func:`hub_offline`)."""
    where, is_local = _resolve(path_or_id)
    try:
        with no_hub_probes(is_local):
            return AutoModelForCausalLM.from_pretrained(where, dtype=dtype,
                                                        local_files_only=is_local or hub_offline())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {hub_hint(is_local)} {path_or_id!r}: {e}") from None


def load_tokenizer(path_or_id: str):
    """A tokenizer by local path, hub id (downloaded unless ``HF_HUB_OFFLINE`` is set) or built-in name
    (``builtin:task``, ``builtin:merged-digits``)."""
    if path_or_id.startswith(BUILTIN_PREFIX):
        return builtin_tokenizer(path_or_id)
    where, is_local = _resolve(path_or_id)
    try:
        with no_hub_probes(is_local):
            tok = AutoTokenizer.from_pretrained(where, local_files_only=is_local or hub_offline())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {hub_hint(is_local)} {path_or_id!r}: {e}") from None
    if tok.pad_token_id is None:
        # Common for real models: pad with EOS. Completion masks keep the real EOS (see tasks.data).
        tok.pad_token = tok.eos_token
    return tok
