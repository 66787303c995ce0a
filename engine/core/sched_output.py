"""What the scheduler hands the runner and the connector's worker side for one step.

Plain data in its own module, so that the runner and the connector read a plan without importing
the scheduler that made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: `num_tokens` tokens from `num_computed_tokens` on."""

    request: Request
    start: int
    num_tokens: int
    sample: bool  # this chunk reaches the end of the known tokens, so a new token is sampled


@dataclass
class SchedulerOutput:
    """One step's plan: which requests run and how many tokens each, and what was freed or preempted."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the previous step was planned: the runner releases
    # their device slots (and those of `preempted`) before placing this step's requests.
    freed_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
