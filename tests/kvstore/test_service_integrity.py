"""Through the real daemon: a block is served only under the namespace and key it was put with, and
its checksum travels unchanged between client and tiers."""

import math
import time
import uuid

import grpc
import pytest
import redis

from fixtures_services import obj_tier, s3_client
from kvstore.checksum import SealedBlock, block_checksum
from kvstore.client import KVStoreClient, KVStoreError, RetryPolicy
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.shm_client import SlotHit
from service_daemon import NS, key, payload, running_daemon

OTHER_NS = "ns-other"
SLOT = 1 << 20
ONCE = RetryPolicy(attempts=1)

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


def _client(url: str, shm: bool) -> KVStoreClient:
    return KVStoreClient(url, retry=ONCE, shm=shm, shm_slot_bytes=SLOT, shm_slots=4)


@pytest.mark.parametrize("shm", [False, True], ids=["payload path", "shm path"])
@pytest.mark.parametrize("tier", ["redis", "obj"])
def test_values_copied_to_another_key_or_namespace_are_misses_and_deleted(tier, shm, redis_url, s3_bucket):
    endpoint, bucket = s3_bucket
    prefix = f"copy-{uuid.uuid4().hex[:8]}"
    if tier == "redis":
        config = {"type": "redis", "url": redis_url, "key_prefix": f"{prefix}:"}
        raw = redis.Redis.from_url(redis_url)
        name = lambda ns, k: f"{prefix}:{ns}:{k.hex()}".encode()                       # noqa: E731
        copy = lambda src, dst: raw.set(dst, raw.get(src))                              # noqa: E731
        exists = lambda n: raw.exists(n) == 1                                           # noqa: E731
    else:
        config = obj_tier(endpoint, bucket, key_prefix=f"{prefix}/")
        raw = s3_client(endpoint)
        name = lambda ns, k: f"{prefix}/{ns}/{k.hex()}"                                 # noqa: E731
        copy = lambda src, dst: raw.copy_object(Bucket=bucket, Key=dst,                 # noqa: E731
                                                CopySource={"Bucket": bucket, "Key": src})
        exists = lambda n: raw.list_objects_v2(Bucket=bucket, Prefix=n).get("KeyCount", 0) == 1  # noqa: E731
    with running_daemon([config]) as (_, url), _client(url, shm) as client:
        assert (client.shm is not None) == shm
        assert client.put(NS, [(key(1), payload(1, 50_000))], ttl_s=600) == 1
        for namespace, k in [(NS, key(2)), (OTHER_NS, key(1))]:
            copy(name(NS, key(1)), name(namespace, k))
            assert client.get(namespace, [k]) == [None]
            assert not exists(name(namespace, k))
        assert client.get(NS, [key(1)]) == [payload(1, 50_000)]


def test_a_block_expiry_no_tier_can_hold_is_invalid_argument():
    data = b"payload"
    with running_daemon() as (handle, url):
        channel = grpc.insecure_channel(url.removeprefix("grpc://"))
        stub = pb_grpc.KVStoreStub(channel)
        for expires_at in (math.nan, math.inf, -1.0, time.time() + 11 * 365 * 86400):
            start = pb.BlockStart(key=key(1), size=len(data), checksum=block_checksum(data, NS, key(1), expires_at),
                                  expires_at=expires_at, data=data)
            messages = [pb.PutRequest(header=pb.PutHeader(namespace=NS)), pb.PutRequest(block=start)]
            with pytest.raises(grpc.RpcError) as info:
                stub.Put(iter(messages), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("blocks[0].expires_at: must be wall-clock seconds > 0")
        assert handle.store.lookup(NS, [key(1)]).num_hits == 0
        channel.close()


@pytest.mark.parametrize("shm", [False, True], ids=["payload path", "shm path"])
def test_sealed_blocks_keep_the_callers_checksum_from_client_to_tier_and_back(shm):
    data = payload(3, 100_000)
    with running_daemon() as (handle, url), _client(url, shm) as client:
        mine = SealedBlock.seal(data, NS, key(1), checksum=block_checksum(data, NS, key(1)))
        expires_at = time.time() + 900
        own_expiry = SealedBlock.seal(data, NS, key(2), expires_at)
        assert client.put_sealed(NS, [(key(1), mine), (key(2), own_expiry)]) == 2
        assert handle.store.get_sealed(NS, [key(1), key(2)]) == [mine, own_expiry]
        assert client.get_sealed(NS, [key(1), key(2)]) == [mine, own_expiry]
        # A PutHeader ttl_s rebinds the checksum to the daemon's expiry.
        assert client.put_sealed(NS, [(key(3), SealedBlock.seal(data, NS, key(3)))], ttl_s=60) == 1
        (block,) = client.get_sealed(NS, [key(3)])
        assert 0 < block.expires_at - time.time() <= 60
        assert block.checksum == block_checksum(data, NS, key(3), block.expires_at)
        # The daemon verifies what it receives: a block sealed for another key is refused, none stored.
        with pytest.raises(KVStoreError) as info:
            client.put_sealed(NS, [(key(4), mine)])
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        assert info.value.details.startswith("blocks[0]: checksum mismatch")
        assert client.lookup(NS, [key(4)]).num_hits == 0


def test_slots_with_checksums_from_the_caller_and_unverified_hits():
    blocks = [(key(i), payload(i, 1000 + i)) for i in range(3)]
    with running_daemon() as (handle, url), _client(url, True) as client:
        segment = client.shm.segment()
        with segment.acquire(3, timeout=5) as lease:
            for j, (_, data) in enumerate(blocks):
                lease.view(j, len(data))[:] = data
            sums = [block_checksum(data, NS, k) for k, data in blocks]
            entries = [(k, len(data)) for k, data in blocks]
            with pytest.raises(KVStoreError) as info:
                client.put_slots(NS, lease, entries, checksums=[sums[0], sums[1] ^ 1, sums[2]])
            assert info.value.code == grpc.StatusCode.DATA_LOSS
            assert info.value.details.startswith("blocks[1]: checksum mismatch")
            assert client.put_slots(NS, lease, entries, checksums=sums) == 3
            assert [b.checksum for b in handle.store.get_sealed(NS, [k for k, _ in blocks])] == sums
        with segment.acquire(3, timeout=5) as lease:
            hits = client.get_slot_hits(NS, lease, [key(2), key(9), key(0)])
            assert hits == [SlotHit(len(blocks[2][1]), sums[2], None), None, SlotHit(len(blocks[0][1]), sums[0], None)]
            assert bytes(lease.view(0, hits[0].length)) == blocks[2][1]
            assert hits[0].intact(lease.view(0, hits[0].length), NS, key(2))
            assert not hits[0].intact(lease.view(0, hits[0].length), NS, key(0))
