"""KV-cached batched sampling and the logits-processor chain (see ``sampler`` for the order of operations)."""

from distillarena.decoding.decoders import (
    HFDecoder,
    IncrementalDecoder,
    LlamaDecoder,
    forget_fused_weights,
    llama_fast_path_supported,
    make_decoder,
    model_vocab_size,
    positions_from_mask,
)
from distillarena.decoding.processors import (
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    apply_processors,
    begin_processors,
    sample_from_probs,
    sampling_warpers,
)
from distillarena.decoding.sampler import RevealFn, SampleResult, cut_at_stop_strings, sample

__all__ = [
    "HFDecoder",
    "IncrementalDecoder",
    "LlamaDecoder",
    "RevealFn",
    "SampleResult",
    "TemperatureProcessor",
    "TopKProcessor",
    "TopPProcessor",
    "apply_processors",
    "begin_processors",
    "cut_at_stop_strings",
    "forget_fused_weights",
    "llama_fast_path_supported",
    "make_decoder",
    "model_vocab_size",
    "positions_from_mask",
    "sample",
    "sample_from_probs",
    "sampling_warpers",
]
