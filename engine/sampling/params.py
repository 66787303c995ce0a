"""Per-request sampling parameters, with vLLM's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Temperatures below this are greedy decoding (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
# The sampler holds top_k as int32: a larger one would wrap around (2**32 + 5 filtering to 5).
MAX_TOP_K = (1 << 31) - 1


@dataclass
class SamplingParams:
    """How one request's tokens are chosen and when its generation stops.

    Validated once in ``__post_init__``: a bad value raises ``ValueError`` naming the
    parameter and the range it must lie in. ``stop`` is normalised to a list of strings.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)
        self._validate()

    @property
    def greedy(self) -> bool:
        """True when this request is decoded greedily (temperature ~ 0)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """True when any of the repetition/presence/frequency penalties is active."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def _validate(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.n > 1:
            raise ValueError(f"n > 1 is not supported (got n={self.n}); send n separate requests")
        _check_number("temperature", self.temperature, "a number >= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
        if not _is_int(self.top_k) or not (self.top_k in (0, -1) or self.top_k >= 1):
            raise ValueError(
                f"top_k must be an integer >= 1, or 0 or -1 to disable it, got {self.top_k!r}"
            )
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"top_k must be at most {MAX_TOP_K}, got {self.top_k}")
        _check_number("min_p", self.min_p, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"max_tokens must be an integer >= 1 (or None for up to the model length), "
                f"got {self.max_tokens!r}"
            )
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_number(
            "repetition_penalty", self.repetition_penalty, "a number > 0", lambda v: v > 0
        )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: object, expected: str, in_range) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and in_range(value)
    )
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _normalise_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or s == "":
            raise ValueError(f"stop must be a non-empty string or a list of them, got {s!r}")
    return stops


def _normalise_stop_token_ids(ids: list[int] | None) -> list[int]:
    if ids is None:
        return []
    ids = list(ids)
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(
                f"stop_token_ids must be a list of non-negative integers, got {token_id!r}"
            )
    return ids
