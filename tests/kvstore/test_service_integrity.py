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
from service_daemon import NS, key, payload, running_daemon

OTHER_NS = "ns-other"
ONCE = RetryPolicy(attempts=1)


@pytest.mark.parametrize("tier", ["redis", "obj"])
def test_values_copied_to_another_key_or_namespace_are_misses_and_deleted(tier, redis_url, s3_bucket):
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
    with running_daemon([config]) as (_, url), KVStoreClient(url, retry=ONCE) as client:
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


def test_sealed_blocks_keep_the_callers_checksum_from_client_to_tier_and_back():
    data = payload(3, 100_000)
    with running_daemon() as (handle, url), KVStoreClient(url, retry=ONCE) as client:
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

