"""Antidistillation sampling (Savani et al., 2025): ``z_T / tau + lambda * b`` per step.

``b`` is the directional derivative of the proxy student's next-token log-probs along ``g``, the gradient of the
proxy's loss on holdout traces: ``b(y) = d/d eps log p_P(y | x; theta + eps g) at eps = 0``, the first-order increase
of the proxy's holdout loss after a gradient step on token ``y`` (up to sign conventions), so ``+lambda b`` promotes
tokens that would hurt a student trained on them.

Two ways to get ``b``, both exact up to their own errors:

- ``method="fd"``: the central finite difference of the reference code, two perturbed proxy copies
  ``theta +- eps g``, each with its own KV cache: ``b = (log p(theta + eps g) - log p(theta - eps g)) / (2 eps)``
  (two proxy forwards per token, error O(eps^2) plus rounding);
- ``method="jvp"``: forward-mode automatic differentiation through the proxy and its KV cache
  (``torch.autograd.forward_ad``, the engine of ``torch.func.jvp``) on the proxy itself, no copy (one dual proxy
  forward per token, roughly 2-3x the cost of a plain one).

The reference code differentiates raw logits rather than log-probs; the two differ by a per-row constant, which
``softmax`` ignores, so both sample the same distribution.

**Normalisation of g (lambda's scale depends on it).** The gradient file stores the raw gradient
``g = grad_theta L_H`` with ``L_H`` = the mean over holdout traces of each trace's mean token NLL (completion tokens
only when labels mask the prompt), in float32, plus its global L2 norm ``||g||``. The processor uses the direction

- ``normalize="unit"`` (default): ``g / ||g||``, a unit vector in parameter space. ``b`` is then a log-prob change
  per unit of parameter-space distance, ``eps`` is a parameter-space distance, and ``lambda`` does not depend on
  the holdout loss level or size. ``lambda_unit = lambda_raw * ||g||``.
- ``normalize="none"``: ``g`` itself, as the reference code does (its ``eps = 0.01``, ``lambda ~ 0.05``).

The proxy gradient is an offline step (:func:`compute_proxy_gradient`), saved as a safetensors file whose metadata
identifies the proxy it was computed for (:func:`~distillarena.defenses.proxy.model_fingerprint`);
:func:`load_proxy_gradient` refuses a file computed for another proxy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import LogitsProcessor

from distillarena.core.errors import UserError
from distillarena.decoding.decoders import model_vocab_size, positions_from_mask
from distillarena.defenses.proxy import LockstepProxy, check_same_vocabulary
from distillarena.models.fingerprint import model_fingerprint, tokenizer_fingerprint

FORMAT = "distillarena.proxy_gradient/1"
NORMALIZATIONS = ("unit", "none")


@dataclass
class ProxyGradient:
    """The raw holdout-loss gradient of a proxy (float32, one tensor per named parameter) and what identifies it."""

    grads: dict[str, Tensor]
    norm: float  # global L2 norm of the raw gradient
    proxy_fingerprint: str
    vocab_size: int
    tokenizer_fingerprint: str | None = None
    metadata: dict = field(default_factory=dict)  # loss, traces, tokens, holdout fingerprint, seconds, ...

    def direction(self, normalize: str = "unit") -> dict[str, Tensor]:
        """The direction ``g`` used by antidistillation sampling (see the module docstring)."""
        if normalize not in NORMALIZATIONS:
            raise UserError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if normalize == "none":
            return dict(self.grads)
        if not self.norm > 0:
            raise UserError("the proxy gradient is zero: the holdout loss does not depend on the proxy's weights")
        return {k: v / self.norm for k, v in self.grads.items()}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "norm": self.norm,
            "proxy_fingerprint": self.proxy_fingerprint,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            **self.metadata,
        }
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.grads.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"distillarena": json.dumps(meta)})
        tmp.replace(path)
        return path


def _batch_fields(batch) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(batch, Mapping):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
    elif isinstance(batch, Tensor):
        ids, mask, labels = batch, None, None
    else:
        raise UserError("a holdout batch must be a dict with input_ids (and optionally attention_mask, labels)")
    if mask is None:
        mask = torch.ones_like(ids)
    if labels is None:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def compute_proxy_gradient(
    proxy: torch.nn.Module,
    holdout_batches: Iterable,
    *,
    path: str | Path | None = None,
    tokenizer=None,
    progress: Callable[[int, int], None] | None = None,
) -> ProxyGradient:
    """Gradient of the proxy's mean per-trace NLL on the holdout traces (one backward pass over them).

    ``holdout_batches`` yields dicts with ``input_ids`` ``[B, L]`` and optionally ``attention_mask`` and ``labels``
    (``-100`` = not scored; default: every real token). Each trace's loss is its mean token NLL over the scored
    next-token positions; ``L_H`` is the mean over traces, accumulated exactly across batches. The proxy's own
    ``.grad`` fields are left untouched; the model is put in eval mode (no dropout) for the pass and restored.
    Saves to ``path`` when given (see :meth:`ProxyGradient.save`). ``progress(traces, tokens)`` is called per batch.
    """
    t0 = time.perf_counter()
    params = {n: p for n, p in proxy.named_parameters() if p.requires_grad}
    if not params:
        raise UserError("the proxy has no trainable parameters to take a gradient of")
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    data_hash = hashlib.sha256()
    n_traces = n_tokens = 0
    loss_sum = 0.0
    was_training = proxy.training
    proxy.eval()
    try:
        for batch in holdout_batches:
            ids, mask, labels = _batch_fields(batch)
            data_hash.update(ids.cpu().numpy().tobytes())
            data_hash.update(labels.cpu().numpy().tobytes())
            with torch.enable_grad():
                logits = proxy(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
                target = labels[:, 1:]
                scored = target != -100
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), target.clamp(min=0), reduction="none"
                )
                per_trace_tokens = scored.sum(-1)
                has = per_trace_tokens > 0
                per_trace = (nll * scored).sum(-1) / per_trace_tokens.clamp(min=1)
                batch_loss = per_trace[has].sum()
                grads = torch.autograd.grad(batch_loss, list(params.values()), allow_unused=True)
            for (name, _), gr in zip(params.items(), grads, strict=True):
                if gr is not None:
                    sums[name] += gr.float()
            n_traces += int(has.sum())
            n_tokens += int(per_trace_tokens.sum())
            loss_sum += float(batch_loss.detach())
            if progress is not None:
                progress(n_traces, n_tokens)
    finally:
        proxy.train(was_training)
    if n_traces == 0:
        raise UserError("the holdout set has no scored token: no trace to take the proxy gradient on")
    grads = {n: s / n_traces for n, s in sums.items()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    result = ProxyGradient(
        grads=grads,
        norm=norm,
        proxy_fingerprint=model_fingerprint(proxy),
        vocab_size=model_vocab_size(proxy),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        metadata={
            "loss": loss_sum / n_traces,
            "traces": n_traces,
            "tokens": n_tokens,
            "holdout_fingerprint": data_hash.hexdigest(),
            "proxy_class": type(proxy).__name__,
            "seconds": time.perf_counter() - t0,
        },
    )
    if path is not None:
        result.save(path)
    return result


def load_proxy_gradient(path: str | Path, proxy: torch.nn.Module, *, tokenizer=None) -> ProxyGradient:
    """Load a gradient saved by :func:`compute_proxy_gradient` and check it was computed for ``proxy``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no proxy gradient file at {path} (compute it first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("distillarena")
            grads = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise UserError(f"{path} is not a distillarena proxy gradient (no metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    fp = model_fingerprint(proxy)
    if meta["proxy_fingerprint"] != fp:
        raise UserError(
            f"the proxy gradient in {path} was computed for another proxy "
            f"(fingerprint {meta['proxy_fingerprint'][:12]}, this proxy {fp[:12]}): recompute it for this proxy"
        )
    if meta["vocab_size"] != model_vocab_size(proxy):
        raise UserError(f"the proxy gradient in {path} is for a vocabulary of {meta['vocab_size']}")
    if tokenizer is not None and meta.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint(tokenizer)):
        raise UserError(f"the proxy gradient in {path} was computed with another tokenizer")
    _check_grad_shapes(grads, proxy, str(path))
    known = {"format", "norm", "proxy_fingerprint", "vocab_size", "tokenizer_fingerprint"}
    return ProxyGradient(
        grads=grads,
        norm=float(meta["norm"]),
        proxy_fingerprint=meta["proxy_fingerprint"],
        vocab_size=int(meta["vocab_size"]),
        tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
        metadata={k: v for k, v in meta.items() if k not in known},
    )


def _check_grad_shapes(grads: Mapping[str, Tensor], proxy: torch.nn.Module, where: str) -> None:
    params = dict(proxy.named_parameters())
    missing = sorted(set(params) - set(grads))
    extra = sorted(set(grads) - set(params))
    if missing or extra:
        raise UserError(f"the proxy gradient ({where}) does not match the proxy's parameters: "
                        f"missing {missing[:3]}, unexpected {extra[:3]}")
    for n, p in params.items():
        if tuple(grads[n].shape) != tuple(p.shape):
            raise UserError(f"the proxy gradient ({where}) has shape {tuple(grads[n].shape)} for {n}, "
                            f"the proxy {tuple(p.shape)}")


# ---------------------------------------------------------------------------------------------------------------
def antidistillation_scores(teacher_logits: Tensor, b: Tensor, lam: float, temperature: float = 1.0) -> Tensor:
    """``teacher_logits / temperature + lam * b`` (exactly ``teacher_logits / temperature`` when ``lam == 0``)."""
    scaled = teacher_logits / temperature
    if lam == 0:
        return scaled
    return scaled + lam * b.to(scaled.dtype)


def log_softmax_jvp(logits: Tensor, dlogits: Tensor) -> Tensor:
    """Directional derivative of ``log_softmax(z)`` given that of ``z``: ``dz - sum(softmax(z) * dz)``."""
    p = torch.softmax(logits.float(), dim=-1)
    dz = dlogits.float()
    return dz - (p * dz).sum(-1, keepdim=True)


class AntidistillationProcessor(LogitsProcessor):
    """Logits processor for antidistillation sampling: returns ``scores / temperature + lam * b``.

    It applies the temperature itself (``applies_temperature = True``): leave the sampler's (or ``generate``'s)
    temperature at 1. ``gradient`` is a :class:`ProxyGradient` or the path of a saved one; it must have been
    computed for ``proxy``. ``method`` is ``"fd"`` (two perturbed copies, ``eps``) or ``"jvp"`` (forward mode, no
    copy). ``normalize`` picks the direction (see the module docstring). Teacher / tokenizer / ``pad_token_id`` /
    ``fast`` as for :class:`~distillarena.defenses.poe.ProductOfExpertsProcessor`.
    """

    applies_temperature = True

    def __init__(self, proxy: torch.nn.Module, gradient: ProxyGradient | str | Path, lam: float, *,
                 temperature: float = 1.0, method: str = "fd", eps: float = 1e-2, normalize: str = "unit",
                 teacher: torch.nn.Module | int | None = None, teacher_tokenizer=None, proxy_tokenizer=None,
                 pad_token_id: int | None = None, fast: bool | None = None):
        if not math.isfinite(float(lam)):
            raise UserError(f"antidistillation lambda must be a finite number, got {lam}")
        if not (float(temperature) > 0 and math.isfinite(float(temperature))):
            raise UserError(f"antidistillation temperature must be > 0, got {temperature}")
        if method not in ("fd", "jvp"):
            raise UserError(f"antidistillation method must be 'fd' or 'jvp', got {method!r}")
        if method == "fd" and not (float(eps) > 0 and math.isfinite(float(eps))):
            raise UserError(f"antidistillation eps must be > 0, got {eps}")
        self.lam, self.temperature, self.method, self.eps = float(lam), float(temperature), method, float(eps)
        teacher_vocab = teacher if isinstance(teacher, int) or teacher is None else model_vocab_size(teacher)
        self.vocab_size = check_same_vocabulary(teacher_vocab, proxy, teacher_tokenizer=teacher_tokenizer,
                                                proxy_tokenizer=proxy_tokenizer)
        if not isinstance(gradient, ProxyGradient):
            gradient = load_proxy_gradient(gradient, proxy, tokenizer=proxy_tokenizer)
        elif gradient.proxy_fingerprint != model_fingerprint(proxy):
            raise UserError("the proxy gradient was computed for another proxy: recompute it for this proxy")
        else:
            _check_grad_shapes(gradient.grads, proxy, "given ProxyGradient")
        self.gradient = gradient
        self._proxies: list[LockstepProxy] = []
        if self.lam == 0:
            return  # exactly temperature sampling: no proxy to run
        direction = gradient.direction(normalize)
        if method == "jvp":
            tangents = {n: direction[n].to(p.dtype).to(p.device) for n, p in proxy.named_parameters()}
            self._proxies = [LockstepProxy(proxy, pad_token_id=pad_token_id, fast=fast, tangents=tangents)]
        else:
            copies = []
            for sign in (1.0, -1.0):
                twin = copy.deepcopy(proxy).eval()
                with torch.no_grad():
                    for n, p in twin.named_parameters():
                        p.add_(direction[n].to(p.dtype).to(p.device), alpha=sign * self.eps)
                copies.append(LockstepProxy(twin, pad_token_id=pad_token_id, fast=fast))
            self._proxies = copies

    def begin(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 64) -> None:
        for p in self._proxies:
            p.begin(input_ids, attention_mask, max_new_tokens)

    def reset(self) -> None:
        for p in self._proxies:
            p.reset()

    @property
    def proxy_forwards(self) -> int:
        return sum(p.forwards for p in self._proxies)

    def penalty(self, input_ids: Tensor) -> Tensor:
        """``b`` ``[B, V]`` for the sequences ``input_ids`` (advances the proxies' state like a call does)."""
        if not self._proxies:
            raise UserError("lambda = 0: this processor runs no proxy and computes no penalty")
        if self.method == "jvp":
            logits, dlogits = self._proxies[0](input_ids)
            return log_softmax_jvp(logits, dlogits)
        plus, minus = (p(input_ids) for p in self._proxies)
        return (torch.log_softmax(plus.float(), -1) - torch.log_softmax(minus.float(), -1)) / (2 * self.eps)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.lam == 0:
            return antidistillation_scores(scores, scores, 0.0, self.temperature)
        if scores.shape[-1] != self.vocab_size:
            raise UserError(f"the teacher's scores have {scores.shape[-1]} entries but the proxy has "
                            f"{self.vocab_size} logits: proxy and teacher must share the vocabulary")
        return antidistillation_scores(scores, self.penalty(input_ids), self.lam, self.temperature)


__all__ = [
    "AntidistillationProcessor",
    "ProxyGradient",
    "antidistillation_scores",
    "compute_proxy_gradient",
    "load_proxy_gradient",
    "log_softmax_jvp",
]
