"""Sampling: per-request parameters and the batched, seeded sampler."""

from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler, SamplerOutput, SamplingBatch

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "SamplingParams"]
