from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_hits", "tiers")
    NUM_HITS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    num_hits: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, num_hits: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace", "tiers", "ttl_s")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    ttl_s: float
    def __init__(self, namespace: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class BlockStart(_message.Message):
    __slots__ = ("key", "size", "checksum", "expires_at", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    checksum: int
    expires_at: float
    data: bytes
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ..., expires_at: _Optional[float] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "block", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    block: BlockStart
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., block: _Optional[_Union[BlockStart, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Miss(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    def __init__(self, key: _Optional[bytes] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("block", "miss", "data")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MISS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block: BlockStart
    miss: Miss
    data: bytes
    def __init__(self, block: _Optional[_Union[BlockStart, _Mapping]] = ..., miss: _Optional[_Union[Miss, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierUsage(_message.Message):
    __slots__ = ("namespace", "tier", "blocks", "bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    tier: str
    blocks: int
    bytes: int
    def __init__(self, namespace: _Optional[str] = ..., tier: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class TierHealth(_message.Message):
    __slots__ = ("tier", "up")
    TIER_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    tier: str
    up: bool
    def __init__(self, tier: _Optional[str] = ..., up: _Optional[bool] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("usage", "tiers")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.RepeatedCompositeFieldContainer[TierUsage]
    tiers: _containers.RepeatedCompositeFieldContainer[TierHealth]
    def __init__(self, usage: _Optional[_Iterable[_Union[TierUsage, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierHealth, _Mapping]]] = ...) -> None: ...

class AttachSlabRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SlabSession(_message.Message):
    __slots__ = ("session_id", "segment_name", "num_slots", "slot_bytes", "slots_offset", "nonce_offset", "nonce_len")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NONCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NONCE_LEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    segment_name: str
    num_slots: int
    slot_bytes: int
    slots_offset: int
    nonce_offset: int
    nonce_len: int
    def __init__(self, session_id: _Optional[str] = ..., segment_name: _Optional[str] = ..., num_slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., slots_offset: _Optional[int] = ..., nonce_offset: _Optional[int] = ..., nonce_len: _Optional[int] = ...) -> None: ...

class SlabHandle(_message.Message):
    __slots__ = ("session_id", "nonce")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nonce: bytes
    def __init__(self, session_id: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class AllocateSlotsRequest(_message.Message):
    __slots__ = ("session", "count")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    session: SlabHandle
    count: int
    def __init__(self, session: _Optional[_Union[SlabHandle, _Mapping]] = ..., count: _Optional[int] = ...) -> None: ...

class AllocateSlotsResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, slots: _Optional[_Iterable[int]] = ...) -> None: ...

class AcquireSlotsRequest(_message.Message):
    __slots__ = ("session", "namespace", "keys")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session: SlabHandle
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session: _Optional[_Union[SlabHandle, _Mapping]] = ..., namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SlotBlock(_message.Message):
    __slots__ = ("slot", "checksum", "expires_at", "length")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    slot: int
    checksum: int
    expires_at: float
    length: int
    def __init__(self, slot: _Optional[int] = ..., checksum: _Optional[int] = ..., expires_at: _Optional[float] = ..., length: _Optional[int] = ...) -> None: ...

class AcquireSlotsResponse(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[SlotBlock]
    def __init__(self, blocks: _Optional[_Iterable[_Union[SlotBlock, _Mapping]]] = ...) -> None: ...

class CommittedSlot(_message.Message):
    __slots__ = ("key", "slot", "checksum", "expires_at")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    slot: int
    checksum: int
    expires_at: float
    def __init__(self, key: _Optional[bytes] = ..., slot: _Optional[int] = ..., checksum: _Optional[int] = ..., expires_at: _Optional[float] = ...) -> None: ...

class CommitSlotsRequest(_message.Message):
    __slots__ = ("session", "header", "blocks")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    session: SlabHandle
    header: PutHeader
    blocks: _containers.RepeatedCompositeFieldContainer[CommittedSlot]
    def __init__(self, session: _Optional[_Union[SlabHandle, _Mapping]] = ..., header: _Optional[_Union[PutHeader, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[CommittedSlot, _Mapping]]] = ...) -> None: ...

class ReleaseSlotsRequest(_message.Message):
    __slots__ = ("session", "slots")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    session: SlabHandle
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[_Union[SlabHandle, _Mapping]] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseSlotsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
