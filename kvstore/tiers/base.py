"""The Tier interface: what the store asks of CPU memory, Redis and S3 alike.

Every method is batched (one call per request, not per block) because Redis pipelines and S3's
many-in-flight requests only pay off on batches. Tiers store and return `SealedBlock`s as they were
given (checksum and expiry untouched: both are under the checksum) and do not judge them: the store
verifies every block it reads against the namespace and key it asked for, and deletes bad copies. A
remote tier signals trouble by raising `TierError`; the store turns that into a miss or a skipped
write.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from kvstore.checksum import SealedBlock


class TierError(Exception):
    """A tier could not answer (unreachable, timed out, refused); the message holds no credentials."""


@dataclass(frozen=True)
class TierUsage:
    """What one tier holds for one namespace."""

    blocks: int
    bytes: int


Evicted = tuple[str, bytes, SealedBlock]
"""(namespace, key, block) pushed out of a tier by its byte budget."""


def escape_namespace(namespace: str) -> str:
    """A namespace as it appears in Redis keys and S3 object names: percent-encoded, so it holds
    no ':' or '/' (the separators before the key) and no glob characters. Namespaces may contain
    ':' (`tenant:b`); unescaped, `tenant`'s SCAN pattern `prefix:tenant:*` and S3 prefix matched
    `tenant:b`'s blocks too, and `clear("tenant")` deleted them."""
    return quote(namespace, safe="")


def unescape_namespace(escaped: str) -> str:
    return unquote(escaped)


class Tier(ABC):
    """One storage level. Implementations are thread-safe."""

    name: str
    # Whether the store checks checksums of blocks read from this tier (memory may opt out).
    verify_reads: bool = True
    # Whether anything below takes this tier's evictions (the store clears it on its last tier,
    # so a tier that must copy an evicted block's bytes out to hand it over can skip the copy).
    evictions_wanted: bool = True

    @abstractmethod
    def get(self, namespace: str, keys: Sequence[bytes]) -> list[SealedBlock | None]:
        """The stored blocks (None = absent or expired), in key order."""

    @abstractmethod
    def contains(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are present and not expired, without reading payloads."""

    @abstractmethod
    def put(self, namespace: str, blocks: Sequence[tuple[bytes, SealedBlock]]) -> list[Evicted]:
        """Store blocks (overwriting); return what the byte budget pushed out, for write-down."""

    @abstractmethod
    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove keys; the number that were present."""

    @abstractmethod
    def clear(self, namespace: str) -> int:
        """Remove every block of a namespace; the number removed."""

    @abstractmethod
    def usage(self) -> dict[str, TierUsage]:
        """Blocks and payload bytes held, per namespace."""

    def ping(self) -> None:
        """Raise TierError if the tier cannot be reached."""

    def close(self) -> None:
        """Release connections and threads."""
