"""The per-request offloading policy: `on_new_request(info) -> Decision`.

A policy decides, for each new request, whether its prefix is looked up and loaded from the
store, whether its full blocks are saved, to which tiers, and for how long (the final partial
block is never saved: docs/policies.md says why). Built-ins are chosen by name; a user's own class
loads from `{"class": "package.module:Name", ...kwargs}` (see docs/policies.md).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engine.connector.cost_model import RateEstimates
from kvstore.config import ConfigError


@dataclass(frozen=True)
class RequestInfo:
    """What a policy knows about a request when it arrives."""

    request_id: str
    prompt_len: int
    gpu_hit_tokens: int          # tokens the engine's own GPU prefix cache already holds
    priority: int
    model: str
    metadata: dict[str, Any] = field(default_factory=dict)  # caller data: OpenAI `user`, headers, ...
    # The measured rates the load-or-recompute model uses (engine/connector/cost_model.py).
    rates: RateEstimates = field(default_factory=lambda: RateEstimates({}, None))


@dataclass(frozen=True)
class Decision:
    """What to do with one request's KV. `tiers=None` lets the store write through its first tier
    only (the rest is write-back on eviction); a list names every tier to write through. `ttl_s`
    bounds how long the saved blocks live (None: the tiers' own TTL). `cost_model=False` loads the
    whole hit even where the measured rates say recomputing it is faster."""

    load: bool = True
    save: bool = True
    tiers: list[str] | None = None
    ttl_s: float | None = None
    cost_model: bool = True   # load only what the measured rates say is faster than recomputing


@runtime_checkable
class OffloadPolicy(Protocol):
    def on_new_request(self, info: RequestInfo) -> Decision: ...


class SaveAll:
    """Load and save every request, through `tiers` (default: the store's first tier)."""

    def __init__(self, tiers: list[str] | None = None, ttl_s: float | None = None) -> None:
        self.decision = Decision(tiers=_tier_list(tiers, "policy.tiers"), ttl_s=_ttl(ttl_s, "policy.ttl_s"))
        self.tier_choices = {"policy.tiers": tiers} if tiers else {}

    def on_new_request(self, info: RequestInfo) -> Decision:
        return self.decision


class MinPromptTokens:
    """Save only prompts of at least `min_tokens` tokens (short ones are cheap to recompute);
    every request may still load."""

    def __init__(self, min_tokens: int, tiers: list[str] | None = None, ttl_s: float | None = None) -> None:
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise ConfigError("policy.min_tokens: expected an integer >= 0")
        self.min_tokens = min_tokens
        self.save = Decision(tiers=_tier_list(tiers, "policy.tiers"), ttl_s=_ttl(ttl_s, "policy.ttl_s"))
        self.load_only = Decision(save=False)
        self.tier_choices = {"policy.tiers": tiers} if tiers else {}

    def on_new_request(self, info: RequestInfo) -> Decision:
        return self.save if info.prompt_len >= self.min_tokens else self.load_only


class TierByLength:
    """Short or low-priority prompts stay in memory; long or high-priority ones are written
    through to every tier so other replicas (and restarts) find them.

    `rules` is a list of {"min_tokens": N, "tiers": [...], "ttl_s": ...}; the rule with the
    largest `min_tokens` not above the prompt length wins. A request whose `priority` is at
    least `high_priority` takes the last rule.
    """

    def __init__(self, rules: list[dict[str, Any]], high_priority: int | None = None) -> None:
        if not isinstance(rules, list) or not rules or not all(isinstance(r, dict) for r in rules):
            raise ConfigError("policy.rules: expected a non-empty list of {min_tokens, tiers, ttl_s} objects")
        parsed = []
        for i, rule in enumerate(rules):
            unknown = set(rule) - {"min_tokens", "tiers", "ttl_s"}
            if unknown:
                raise ConfigError(f"policy.rules.{i}: unknown key {sorted(unknown)[0]!r}")
            if not isinstance(rule.get("min_tokens"), int) or not isinstance(rule.get("tiers"), list):
                raise ConfigError(f"policy.rules.{i}: expected min_tokens (int) and tiers (list of tier names)")
            parsed.append((rule["min_tokens"], _tier_list(rule["tiers"], f"policy.rules.{i}.tiers"),
                           _ttl(rule.get("ttl_s"), f"policy.rules.{i}.ttl_s")))
        self.rules = sorted(parsed, key=lambda r: r[0])
        self.high_priority = high_priority
        self.tier_choices = {f"policy.rules.{i}.tiers": rule["tiers"] for i, rule in enumerate(rules)}

    def on_new_request(self, info: RequestInfo) -> Decision:
        if self.high_priority is not None and info.priority >= self.high_priority:
            chosen = self.rules[-1]
        else:
            fitting = [r for r in self.rules if r[0] <= info.prompt_len]
            if not fitting:
                return Decision(save=False)
            chosen = fitting[-1]
        return Decision(tiers=chosen[1], ttl_s=chosen[2])


def _tier_list(tiers, key: str) -> list[str] | None:
    if tiers is not None and (not isinstance(tiers, list) or not tiers
                              or not all(isinstance(t, str) for t in tiers)):
        raise ConfigError(f"{key}: expected a non-empty list of tier names, got {tiers!r}")
    return tiers


def _ttl(ttl_s, key: str) -> float | None:
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s <= 0):
        raise ConfigError(f"{key}: expected a positive number of seconds, got {ttl_s!r}")
    return ttl_s


BUILTIN_POLICIES = {"save_all": SaveAll, "min_prompt_tokens": MinPromptTokens, "tier_by_length": TierByLength}


def load_policy(spec: dict[str, Any]) -> OffloadPolicy:
    """Build the policy named by `{"name": ...}` or `{"class": "pkg.mod:Name"}` plus its arguments.

    Any problem is a ConfigError naming the full key (`kv_transfer_config.kv_connector_extra_config.policy...`).
    """
    try:
        return _build_policy(spec)
    except ConfigError as e:
        raise ConfigError(f"{CONFIG_PREFIX}{e}") from None


def check_policy_tiers(policy: OffloadPolicy, available: list[str]) -> None:
    """A built-in policy's tier names must be tiers the store has (a typo would fail every save)."""
    for key, tiers in getattr(policy, "tier_choices", {}).items():
        unknown = [t for t in tiers if t not in available]
        if unknown:
            raise ConfigError(f"{CONFIG_PREFIX}{key}: unknown tier(s) {unknown}; the store has {available}")


CONFIG_PREFIX = "kv_transfer_config.kv_connector_extra_config."


def _build_policy(spec: dict[str, Any]) -> OffloadPolicy:
    args = {k: v for k, v in spec.items() if k not in ("name", "class")}
    if "name" in spec:
        cls = BUILTIN_POLICIES.get(spec["name"])
        if cls is None:
            raise ConfigError(f"policy.name: unknown policy {spec['name']!r}; "
                              f"built-ins: {', '.join(BUILTIN_POLICIES)}")
        where, key = f"policy {spec['name']!r}", "policy.name"
    else:
        cls = _import_class(spec["class"])
        where, key = f"policy class {spec['class']!r}", "policy.class"
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as e:
        raise ConfigError(f"policy: bad arguments for {where}: {e}") from None
    try:
        policy = cls(**args)
    except ConfigError:
        raise
    except Exception as e:  # a user's class that refuses its arguments is a start-up error too
        raise ConfigError(f"{key}: {where} failed to start: {type(e).__name__}: {e}") from None
    if not callable(getattr(policy, "on_new_request", None)):
        raise ConfigError(f"{key}: {where} has no on_new_request(info) method")
    return policy


def _import_class(path: str):
    if not isinstance(path, str):
        raise ConfigError(f"policy.class: expected 'package.module:Name', got {path!r}")
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"policy.class: expected 'package.module:Name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"policy.class: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"policy.class: module {module_name!r} has no {attr!r}") from None
