"""A user's own offloading policy, loaded by the tests as "tests.connector.user_policy:UserAllowList"."""

from __future__ import annotations

from engine.connector.policy import Decision, RequestInfo


class UserAllowList:
    """Offload only requests whose caller metadata names an allowed `user`; remember what it saw."""

    def __init__(self, users: list[str], ttl_s: float | None = None) -> None:
        if not users:
            raise ValueError("users: expected at least one user name")
        self.users = set(users)
        self.ttl_s = ttl_s
        self.seen: list[RequestInfo] = []

    def on_new_request(self, info: RequestInfo) -> Decision:
        self.seen.append(info)
        allowed = info.metadata.get("user") in self.users
        return Decision(load=allowed, save=allowed, ttl_s=self.ttl_s)


class NoHook:
    """Not a policy: it lacks on_new_request."""
