"""Real-model helpers of the command line: a layer-dropped copy of a converted model, saved as its own folder (the
student or Product-of-Experts proxy of ``examples/game-smollm2.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, atomic_write_json
from distillarena.models.presets import load_model, load_tokenizer
from distillarena.train.student import copy_with_layers_dropped

INFO = "distillarena_layers.json"


def save_layer_dropped(src: str | Path, keep_every: int, out: str | Path | None = None, *,
                       force: bool = False) -> Path:
    """Save a float32 copy of the model in ``src`` keeping layers 0, k, 2k, ... (``k = keep_every``) in ``out``
    (default: ``<src>-keep<k>``); reused if already written (``force`` writes it again)."""
    if keep_every < 1:
        raise UserError(f"--keep-every must be >= 1, got {keep_every}")
    src = Path(src)
    out = Path(out) if out is not None else src.with_name(f"{src.name}-keep{keep_every}")
    if (out / INFO).is_file() and not force:
        return out
    model = load_model(str(src), dtype=torch.float32)
    n = model.config.num_hidden_layers
    student = copy_with_layers_dropped(model, keep_every).eval()
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(src)).save_pretrained(tmp)
        atomic_write_json(tmp / INFO, {"source": str(src), "keep_every": keep_every,
                                       "layers": [i for i in range(0, n, keep_every)]})
    return out


def layer_info(folder: str | Path) -> dict:
    return json.loads((Path(folder) / INFO).read_text())
