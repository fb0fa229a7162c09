"""Student initialisation: a preset from scratch, a pretrained folder, or a copy of the teacher with layers dropped;
optionally wrapped with LoRA adapters (peft)."""

from __future__ import annotations

import contextlib
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


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations during backward (transformers' own mechanism; non-reentrant,
    so frozen embeddings under LoRA need no ``enable_input_require_grads``)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"student.gradient_checkpointing: a {type(model).__name__} does not support gradient "
                        "checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a cache is useless while training and conflicts with recomputation


def precision(dtype: str, device: torch.device | str):
    """The context training runs under for a student ``dtype``: bfloat16 autocast (float32 master weights, float32
    optimizer state; matmuls in bfloat16, reductions such as log-softmax in float32) or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise UserError(f"student.dtype must be float32 or bfloat16, got {dtype!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


class UnderPrecision:
    """``fn(*args)`` called under :func:`precision`; other attributes pass through to ``fn`` (e.g. a loss's
    ``pop_metrics``)."""

    def __init__(self, fn, dtype: str, device: torch.device | str):
        self.fn, self.dtype, self.device = fn, dtype, device

    def __call__(self, *args, **kwargs):
        with precision(self.dtype, self.device):
            return self.fn(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.fn, name)
