"""A stored block is valid only where it was put: copies to another key or namespace and patched
headers are misses (and deleted); the checksum a block was sealed with is the one every tier keeps."""

import math
import struct
import time
import uuid
import zlib

import pytest
import redis

from fixtures_services import obj_tier, s3_client
from kvstore.checksum import HEADER_BYTES, SealedBlock, block_checksum
from kvstore.store import TieredStore

NS = "ns-a"
OTHER_NS = "ns-b"
# expires_at is the header's last field (kvstore/checksum.py: ... | checksum i64 | expires_at f64).
EXPIRES_AT_OFFSET = HEADER_BYTES - 8


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = 20_000) -> bytes:
    stamp = i.to_bytes(8, "big")
    return (stamp * (size // 8 + 1))[:size]


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


class RawRedis:
    """The Redis tier's values, reached behind the store's back with redis-py."""

    tier = "redis"

    def __init__(self, url: str):
        self.prefix = f"integrity-{uuid.uuid4().hex[:8]}:"
        self.config = {"type": "redis", "url": url, "key_prefix": self.prefix}
        self.client = redis.Redis.from_url(url)

    def name(self, namespace: str, k: bytes) -> bytes:
        return f"{self.prefix}{namespace}:{k.hex()}".encode()

    def read(self, namespace: str, k: bytes) -> bytes:
        return self.client.get(self.name(namespace, k))

    def write(self, namespace: str, k: bytes, frame: bytes) -> None:
        self.client.set(self.name(namespace, k), frame)

    def copy(self, src: tuple[str, bytes], dst: tuple[str, bytes]) -> None:
        self.client.set(self.name(*dst), self.client.get(self.name(*src)))   # a plain SET of the value

    def exists(self, namespace: str, k: bytes) -> bool:
        return self.client.exists(self.name(namespace, k)) == 1


class RawS3:
    """The S3 tier's objects, reached behind the store's back with boto3."""

    tier = "obj"

    def __init__(self, endpoint: str, bucket: str):
        self.prefix = f"integrity-{uuid.uuid4().hex[:8]}/"
        self.bucket = bucket
        self.config = obj_tier(endpoint, bucket, key_prefix=self.prefix)
        self.client = s3_client(endpoint)

    def name(self, namespace: str, k: bytes) -> str:
        return f"{self.prefix}{namespace}/{k.hex()}"

    def read(self, namespace: str, k: bytes) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.name(namespace, k))["Body"].read()

    def write(self, namespace: str, k: bytes, frame: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.name(namespace, k), Body=frame)

    def copy(self, src: tuple[str, bytes], dst: tuple[str, bytes]) -> None:
        self.client.copy_object(Bucket=self.bucket, Key=self.name(*dst),
                                CopySource={"Bucket": self.bucket, "Key": self.name(*src)})

    def exists(self, namespace: str, k: bytes) -> bool:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.name(namespace, k))
        return listed.get("KeyCount", 0) == 1


@pytest.fixture(params=["redis", "obj"])
def raw(request, redis_url, s3_bucket):
    return RawRedis(redis_url) if request.param == "redis" else RawS3(*s3_bucket)


@pytest.mark.parametrize("destination", [(NS, key(2)), (OTHER_NS, key(1)), (OTHER_NS, key(2))],
                         ids=["other key", "other namespace", "other namespace and key"])
def test_a_valid_value_copied_elsewhere_is_a_miss_and_deleted(raw, destination):
    with TieredStore([raw.config]) as store:
        assert store.put(NS, [(key(1), payload(1))], ttl_s=3600) == 1
        raw.copy((NS, key(1)), destination)
        corrupt_before = metric("kvstore_tier_corrupt_total", tier=raw.tier)
        namespace, k = destination
        assert store.get(namespace, [k]) == [None]
        assert not raw.exists(*destination)
        assert metric("kvstore_tier_corrupt_total", tier=raw.tier) == corrupt_before + 1
        assert store.get(NS, [key(1)]) == [payload(1)]   # the original is untouched


@pytest.mark.parametrize("patched", [math.nan, math.inf, -1.0, 0.0, "later"])
def test_a_patched_expiry_in_the_header_is_a_miss_and_deleted(raw, patched):
    with TieredStore([raw.config]) as store:
        store.put(NS, [(key(1), payload(1)), (key(2), payload(2))], ttl_s=3600)
        frame = bytearray(raw.read(NS, key(1)))
        (expires_at,) = struct.unpack_from("<d", frame, EXPIRES_AT_OFFSET)
        # "later": a longer life than the block was put with; 0.0: the header's "never expires".
        struct.pack_into("<d", frame, EXPIRES_AT_OFFSET, expires_at + 3600 if patched == "later" else patched)
        raw.write(NS, key(1), bytes(frame))
        assert store.get(NS, [key(1), key(2)]) == [None, payload(2)]
        assert not raw.exists(NS, key(1))


def test_an_old_v1_frame_is_a_miss_and_deleted(raw):
    data = payload(1)
    v1 = struct.pack("<4sBBHQQd", b"TKVB", 1, 1, 0, len(data), zlib.crc32(data), 0.0) + data
    with TieredStore([raw.config]) as store:
        raw.write(NS, key(1), v1)
        assert store.get(NS, [key(1)]) == [None]
        assert not raw.exists(NS, key(1))


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 8 << 20])
def test_bytes_round_trip_exactly_and_the_stored_checksum_is_the_block_checksum(raw, size):
    data = payload(size, size)
    with TieredStore([raw.config]) as store:
        assert store.put(NS, [(key(1), data)], ttl_s=60) == 1
        assert store.get(NS, [key(1)]) == [data]
        stored = SealedBlock.from_frame(raw.read(NS, key(1)))
        assert stored.payload == data
        assert 0 < stored.expires_at - time.time() <= 60
        assert stored.checksum == block_checksum(data, NS, key(1), stored.expires_at)


def test_promotion_and_write_down_keep_the_checksum(redis_url, s3_bucket):
    s3 = RawS3(*s3_bucket)
    red = RawRedis(redis_url)
    tiers = [{"type": "memory", "bytes": 50_000}, red.config, s3.config]
    with TieredStore(tiers) as store:
        # A block whose checksum the caller computed: kept as it is in every tier it reaches.
        data = payload(1)
        expires_at = time.time() + 600
        sealed = SealedBlock.seal(data, NS, key(1), expires_at, checksum=block_checksum(data, NS, key(1), expires_at))
        assert store.put_sealed(NS, [(key(1), sealed)], tiers=["obj"]) == 1
        assert store.get_sealed(NS, [key(1)]) == [sealed]             # from S3, promoted into Redis and memory
        assert SealedBlock.from_frame(red.read(NS, key(1))) == sealed
        # Three more blocks overflow memory, which pushes out its least recently used (block 1, then
        # block 4, the tail of the chain just put): block 4 is written down to Redis as it was sealed.
        store.put(NS, [(key(i), payload(i)) for i in range(2, 5)])
        assert not red.exists(NS, key(2))
        written_down = SealedBlock.from_frame(red.read(NS, key(4)))
        assert written_down.checksum == block_checksum(payload(4), NS, key(4))
        assert store.get(NS, [key(i) for i in range(1, 5)]) == [payload(i) for i in range(1, 5)]


def test_put_sealed_stores_the_callers_checksum_and_reads_verify_it(raw):
    data = payload(1)
    right = block_checksum(data, NS, key(1))
    with TieredStore([raw.config]) as store:
        # Not recomputed on put: a wrong one is stored as given, then fails on every read.
        store.put_sealed(NS, [(key(1), SealedBlock.seal(data, NS, key(1), checksum=right ^ 1)),
                              (key(2), SealedBlock.seal(data, NS, key(1), checksum=right))])   # sealed for key 1
        assert store.get_sealed(NS, [key(1), key(2)]) == [None, None]
        # An unsigned 64-bit checksum (how a uint64 tensor hands it over) is the same block.
        unsigned = SealedBlock.seal(data, NS, key(1), checksum=right & (2**64 - 1))
        store.put_sealed(NS, [(key(1), unsigned)])
        assert store.get_sealed(NS, [key(1)]) == [SealedBlock(data, right, len(data))]
        # ttl_s rebinds the checksum to the new expiry without reading the payload.
        store.put_sealed(NS, [(key(3), SealedBlock.seal(data, NS, key(3)))], ttl_s=60)
        (block,) = store.get_sealed(NS, [key(3)])
        assert block.payload == data and 0 < block.expires_at - time.time() <= 60
        assert block.checksum == block_checksum(data, NS, key(3), block.expires_at)


@pytest.mark.parametrize("expires_at", [math.nan, math.inf, -5.0, time.time() + 11 * 365 * 86400])
def test_put_sealed_refuses_an_expiry_that_cannot_be_stored(expires_at):
    with TieredStore([{"type": "memory", "bytes": "1MiB"}]) as store:
        good = SealedBlock.seal(b"ok", NS, key(1))
        bad = SealedBlock.seal(b"bad", NS, key(2), expires_at)
        with pytest.raises(ValueError, match=r"^blocks\[1\]\.expires_at: "):
            store.put_sealed(NS, [(key(1), good), (key(2), bad)])
        assert store.lookup(NS, [key(1), key(2)]).num_hits == 0


@pytest.mark.parametrize("ttl_s", [math.inf, math.nan, 1e300, 0.0])
def test_put_sealed_refuses_a_ttl_no_tier_can_hold(ttl_s):
    with TieredStore([{"type": "memory", "bytes": "1MiB"}]) as store:
        with pytest.raises(ValueError, match=r"^ttl_s: must be a positive number of seconds, at most"):
            store.put_sealed(NS, [(key(1), SealedBlock.seal(b"v", NS, key(1)))], ttl_s=ttl_s)


def test_the_s3_tiers_own_ttl_expires_a_block_without_touching_its_header(s3_bucket):
    s3 = RawS3(*s3_bucket)
    with TieredStore([{**s3.config, "ttl_s": 2.0}]) as store:
        put_at = time.monotonic()
        store.put(NS, [(key(1), payload(1))], ttl_s=3600)
        stored = SealedBlock.from_frame(s3.read(NS, key(1)))
        assert stored.expires_at > time.time() + 3000 and stored.intact(NS, key(1))
        if time.monotonic() - put_at < 1.5:   # a loaded box may be past the tier's TTL already
            assert store.get(NS, [key(1)]) == [payload(1)]
        time.sleep(max(0.0, put_at + 2.2 - time.monotonic()))
        assert store.lookup(NS, [key(1)]).num_hits == 0
        assert store.get(NS, [key(1)]) == [None]
        assert not s3.exists(NS, key(1))
