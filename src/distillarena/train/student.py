"""Student initialisation: a preset from scratch, a pretrained folder, or a copy of the teacher with layers dropped;
optionally wrapped with LoRA adapters (peft)."""

from __future__ import annotations

import copy

import torch

from distillarena.core.errors import UserError


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module holding the decoder layers of a Hugging Face causal LM, and the attribute name."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for owner, name in ((base, "layers"), (base, "h"), (base, "blocks")):
        if owner is not None and isinstance(getattr(owner, name, None), torch.nn.ModuleList):
            return owner, name
    raise UserError(f"cannot find the decoder layers of a {type(model).__name__} to drop some of them; "
                    "use a preset or a pretrained student instead")


def copy_with_layers_dropped(teacher: torch.nn.Module, keep_every: int) -> torch.nn.Module:
    """A float32 copy of ``teacher`` keeping layers 0, k, 2k, ... (``k = keep_every``). The copy is a plain model
    of the same class: ``save_pretrained`` / ``from_pretrained`` work on it."""
    student = copy.deepcopy(teacher).to(torch.float32)
    owner, name = decoder_layers(student)
    layers = getattr(owner, name)
    keep = list(range(0, len(layers), keep_every))
    setattr(owner, name, torch.nn.ModuleList([layers[i] for i in keep]))
    cfg = student.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    for new_idx, layer in enumerate(getattr(owner, name)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    return student


def add_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - peft is a dependency
        raise UserError("LoRA needs the peft package: pip install peft") from None
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise UserError(f"student.lora.target_modules {missing} are not modules of the student "
                        f"(it has e.g. {sorted(present - {''})[:12]})")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The student as a plain Hugging Face model: LoRA adapters merged (a copy; the trained model is untouched)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model
