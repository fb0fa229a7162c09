"""The truncation baselines: temperature, top-k and top-p as logits processors (they live in
:mod:`distillarena.decoding.processors`, which the sampler uses too; re-exported here with the other defenses)."""

from distillarena.decoding.processors import TemperatureProcessor, TopKProcessor, TopPProcessor

__all__ = ["TemperatureProcessor", "TopKProcessor", "TopPProcessor"]
