"""Bad requests get the right status and a message, and the daemon keeps serving: token, limits, TLS."""

import logging
import subprocess

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from fixtures_services import obj_tier
from kvstore.checksum import SealedBlock
from kvstore.cli import configure_logging, main
from kvstore.client import KVStoreClient, KVStoreError, RetryPolicy
from kvstore.limits import Limits
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.streaming import CHUNK_BYTES, block_messages
from service_daemon import NS, daemon_and_client, key, payload, running_daemon

TOKEN = "tok-RIGHT-5e1f0c"
ONCE = RetryPolicy(attempts=1)


def _raw_stub(url: str) -> tuple[grpc.Channel, pb_grpc.KVStoreStub]:
    channel = grpc.insecure_channel(url.removeprefix("grpc://"), options=[("grpc.max_send_message_length", 64 << 20)])
    return channel, pb_grpc.KVStoreStub(channel)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_token_missing_or_wrong_is_unauthenticated_and_daemon_keeps_serving(monkeypatch):
    monkeypatch.setenv("KVSTORE_TEST_TOKEN", TOKEN)
    with running_daemon(auth_token_env="KVSTORE_TEST_TOKEN") as (_, url):
        for token, message in ((None, "missing bearer token"), ("tok-WRONG-1", "invalid bearer token")):
            with KVStoreClient(url, token=token, retry=ONCE) as client:
                for call in (lambda: client.lookup(NS, [key(1)]), lambda: client.put(NS, [(key(1), b"x")]),
                             lambda: client.get(NS, [key(1)]), client.stats):
                    with pytest.raises(KVStoreError) as info:
                        call()
                    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                    assert message in info.value.details
                    assert "tok-" not in str(info.value)
        with KVStoreClient(url, token=TOKEN) as client:
            assert client.put(NS, [(key(1), b"abc")]) == 1
            assert client.get(NS, [key(1)]) == [b"abc"]


def test_missing_token_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("KVSTORE_UNSET_TOKEN", raising=False)
    with pytest.raises(ValueError, match="KVSTORE_UNSET_TOKEN is not set"):
        with running_daemon(auth_token_env="KVSTORE_UNSET_TOKEN"):
            pass


@pytest.mark.parametrize(
    "namespace, keys, expected",
    [
        ("", [key(1)], "namespace: must not be empty"),
        ("bad/ns", [key(1)], "namespace: only letters, digits and . _ : - are allowed"),
        ("n" * 33, [key(1)], "namespace: 33 characters, the limit is 32"),
        (NS, [b""], "keys[0]: must not be empty"),
        (NS, [key(1), b"k" * 17], "keys[1]: 17 bytes, the limit is 16"),
        (NS, [key(i) for i in range(9)], "keys: 9 keys in one call, the limit is 8"),
    ],
)
def test_malformed_requests_are_invalid_argument(namespace, keys, expected):
    limits = {"max_namespace_len": 32, "max_key_bytes": 16, "max_keys_per_call": 8}
    with daemon_and_client(**limits) as (_, client):
        calls = {"Lookup": lambda: client.lookup(namespace, keys), "Get": lambda: client.get(namespace, keys),
                 "Delete": lambda: client.delete(namespace, keys)}
        for method, call in calls.items():
            with pytest.raises(KVStoreError) as info:
                call()
            assert (info.value.code, info.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, expected), method
        with pytest.raises(KVStoreError) as info:
            client.put(namespace, [(k, b"v") for k in keys])
        put_expected = "blocks: 9 blocks in one call, the limit (max_keys_per_call) is 8" if len(keys) == 9 else expected
        assert (info.value.code, info.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, put_expected)
        assert client.put(NS, [(key(1), b"ok")]) == 1
        assert client.get(NS, [key(1)]) == [b"ok"]


def test_put_naming_an_unknown_tier_or_bad_ttl_is_invalid_argument():
    with daemon_and_client() as (_, client):
        with pytest.raises(KVStoreError, match="INVALID_ARGUMENT: tiers: unknown tier name; this store has"):
            client.put(NS, [(key(1), b"v")], tiers=["redis"])
        with pytest.raises(KVStoreError, match="INVALID_ARGUMENT: ttl_s: must be a positive"):
            client.put(NS, [(key(1), b"v")], ttl_s=-1.0)


def test_oversized_block_and_oversized_message():
    with running_daemon(max_message_bytes="1MiB") as (_, url), KVStoreClient(url, retry=ONCE) as client:
        with pytest.raises(KVStoreError) as info:
            client.put(NS, [(key(1), payload(1, 2 << 20))])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "blocks[0]: 2097152 bytes, the limit (max_message_bytes) is 1048576" in info.value.details
        channel, stub = _raw_stub(url)
        # One raw gRPC message beyond the transport limit: gRPC itself refuses it.
        huge = [pb.PutRequest(header=pb.PutHeader(namespace=NS)),
                pb.PutRequest(block=pb.BlockStart(key=key(2), size=3 << 20, data=b"x" * (3 << 20)))]
        code, _ = _status(lambda: stub.Put(iter(huge), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()
        assert client.put(NS, [(key(3), payload(3, 1 << 20))]) == 1
        assert client.get(NS, [key(3)]) == [payload(3, 1 << 20)]


def test_a_put_message_over_one_chunk_is_refused_before_it_is_held_whole():
    """gRPC holds a whole message before the handler sees it: the daemon receives no message larger
    than a Put chunk (or its largest unary request), whatever max_message_bytes allows a block."""
    limit = Limits().receive_bytes(CHUNK_BYTES)
    assert limit == CHUNK_BYTES + 4096 + 64
    with running_daemon() as (_, url), KVStoreClient(url, retry=ONCE) as client:
        channel, stub = _raw_stub(url)
        whole = pb.PutRequest(block=pb.BlockStart(key=key(1), size=2 << 20, data=payload(1, 2 << 20)))
        code, details = _status(lambda: stub.Put(iter([pb.PutRequest(header=pb.PutHeader(namespace=NS)), whole]),
                                                 timeout=10))
        assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"SERVER: Received message larger than max ({whole.ByteSize()} vs. {limit})")
        channel.close()
        assert client.put(NS, [(key(1), payload(1, 2 << 20))]) == 1   # the same block in chunks
        assert client.get(NS, [key(1)]) == [payload(1, 2 << 20)]


def test_put_stream_protocol_violations_and_corruption_in_transit():
    with running_daemon() as (_, url):
        channel, stub = _raw_stub(url)
        start, *rest = list(block_messages(key(1), SealedBlock.seal(payload(1, 3 << 20), NS, key(1))))
        header = pb.PutRequest(header=pb.PutHeader(namespace=NS))
        corrupt = pb.BlockStart(key=start.key, size=start.size, checksum=start.checksum ^ 1, data=start.data)
        cases = {
            "no header": ([pb.PutRequest(block=start)], grpc.StatusCode.INVALID_ARGUMENT, "first message of a Put"),
            "data first": ([header, pb.PutRequest(data=b"x")], grpc.StatusCode.INVALID_ARGUMENT, "outside any block"),
            "cut short": ([header, pb.PutRequest(block=start)], grpc.StatusCode.INVALID_ARGUMENT,
                          "the stream ended after 1048576 of 3145728 bytes"),
            "too long": ([header, pb.PutRequest(block=pb.BlockStart(key=key(2), size=1, data=b"ab"))],
                         grpc.StatusCode.INVALID_ARGUMENT, "more data than its declared size of 1 bytes"),
            "bad checksum": ([header, pb.PutRequest(block=corrupt)] + [pb.PutRequest(data=d) for d in rest],
                             grpc.StatusCode.DATA_LOSS, "blocks[0]: checksum mismatch"),
        }
        for name, (messages, code, message) in cases.items():
            got_code, details = _status(lambda: stub.Put(iter(messages), timeout=10))
            assert (got_code, message in details) == (code, True), name
        assert stub.Get(pb.GetRequest(namespace=NS, keys=[key(1)]), timeout=10).next().miss.key == key(1)
        channel.close()


def test_credentials_never_in_logs_errors_or_metrics(caplog, monkeypatch, s3_bucket):
    configure_logging("DEBUG")  # what `kvstore serve --log-level DEBUG` does
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("KVSTORE_TEST_TOKEN", TOKEN)
    endpoint, bucket = s3_bucket
    tiers = [{"type": "memory", "bytes": "64MiB"},
             # A password the redis server does not expect: the tier fails and logs its outage.
             {"type": "redis", "url": "redis://:redisPW-9a7b3c@127.0.0.1:1/0"},
             obj_tier(endpoint, bucket, secret_key="s3SECRET-4d2e8f", access_key="s3ACCESS-77aa")]
    with running_daemon(tiers, auth_token_env="KVSTORE_TEST_TOKEN") as (handle, url):
        with KVStoreClient(url, token="tok-WRONG-2", retry=ONCE) as bad, KVStoreClient(url, token=TOKEN) as good:
            with pytest.raises(KVStoreError) as info:
                bad.stats()
            assert good.put(NS, [(key(1), b"v")], tiers=["redis", "obj"]) == 1
            assert good.get(NS, [key(1)]) == [b"v"]
            assert good.health()["redis"] is False
    exposed = caplog.text + str(info.value) + generate_latest(REGISTRY).decode()
    for secret in (TOKEN, "tok-WRONG-2", "redisPW-9a7b3c", "s3SECRET-4d2e8f", "s3ACCESS-77aa"):
        assert secret not in exposed


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_file),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key_file


def test_tls_round_trip_and_plaintext_refused(tls_files):
    cert, key_file = tls_files
    with running_daemon(tls_cert=str(cert), tls_key=str(key_file)) as (handle, _):
        with KVStoreClient(f"grpcs://localhost:{handle.port}", root_certificates=cert.read_bytes()) as client:
            assert client.put(NS, [(key(1), payload(1, 2 << 20))]) == 1
            assert client.get(NS, [key(1)]) == [payload(1, 2 << 20)]
        with KVStoreClient(f"grpc://127.0.0.1:{handle.port}", retry=ONCE, timeout_s=3) as plain:
            with pytest.raises(KVStoreError) as info:
                plain.stats()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("broken", ["garbage", "other_key"])
def test_a_bad_tls_pair_is_a_config_error_exit_2(tls_files, tmp_path, capsys, broken):
    """`kvstore serve` with garbage PEM or a key that is not the certificate's: exit 2 naming the keys."""
    cert, key_file = tls_files
    if broken == "garbage":
        key_file = tmp_path / "garbage.pem"
        key_file.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    else:
        key_file = tmp_path / "other.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(key_file), "2048"], check=True, capture_output=True)
    config = tmp_path / "kvstore.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntls_cert: {cert}\ntls_key: {key_file}\n"
                      "tiers:\n  - {type: memory, bytes: 1MiB}\n")
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tls_cert, tls_key: not a PEM certificate and its private key" in err
