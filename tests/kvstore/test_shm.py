"""The same-host slab through a real daemon: leases, commits and promotion with exact bytes, eviction
around leases, sessions that end (closed, killed, daemon stopped) releasing their leases, every bad
handle refused, the segment's life in /dev/shm, and a client that re-attaches to a restarted daemon."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fixtures_services import free_port
from kvstore import slab_client
from kvstore.checksum import SealedBlock, block_checksum
from kvstore.client import KVStoreClient, KVStoreError
from kvstore.config import ConfigError, parse_store_config
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.server import serve
from kvstore.slab_client import SlabClient, SlabRefused
from service_daemon import NS, key, payload, running_daemon

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
SLOT = 64 << 10
TOKEN = "tok-slab-41c9"


pytestmark = pytest.mark.usefixtures("no_shm_leftovers")  # every test leaves /dev/shm as it found it


def slab(slots: int = 8, **tier) -> list[dict]:
    return [{"type": "memory", "bytes": slots * SLOT, "slot_bytes": SLOT, **tier}]


def _wait(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _write(client: SlabClient, blocks: list[int], expires_at: float | None = None) -> list[int]:
    """Allocate, fill and commit blocks `blocks` (payload(i, SLOT) under key(i)); their slots."""
    slots = client.allocate(len(blocks))
    assert len(slots) == len(blocks)
    for i, slot in zip(blocks, slots):
        client.view(slot)[:] = payload(i, SLOT)
    sums = [block_checksum(payload(i, SLOT), NS, key(i), expires_at) for i in blocks]
    assert client.commit(NS, [key(i) for i in blocks], slots, sums, [expires_at] * len(blocks)) == len(blocks)
    return slots


def _stub(url: str) -> tuple[grpc.Channel, pb_grpc.KVStoreStub]:
    channel = grpc.insecure_channel(url.removeprefix("grpc://"))
    return channel, pb_grpc.KVStoreStub(channel)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_leased_slots_commit_and_load_exact_bytes_shared_with_the_payload_path():
    with running_daemon(slab()) as (handle, url), SlabClient(url) as a, SlabClient(url) as b, \
            KVStoreClient(url) as kv:
        assert (a.num_slots, a.slot_bytes) == (8, SLOT) and handle.slab.count == 2
        _write(a, [0, 1, 2])
        # Another session sees the blocks in its own mapping of the same memory.
        found = b.acquire(NS, [key(0), key(1), key(2), key(3)])
        assert [f.length for f in found] == [SLOT] * 3
        assert [bytes(b.view(f.slot)) for f in found] == [payload(i, SLOT) for i in range(3)]
        assert [f.checksum for f in found] == [block_checksum(payload(i, SLOT), NS, key(i)) for i in range(3)]
        b.release([f.slot for f in found])
        # The payload path reads and writes the same slab: shorter blocks keep their length.
        assert kv.get(NS, [key(2), key(0)]) == [payload(2, SLOT), payload(0, SLOT)]
        assert kv.put(NS, [(key(7), b"seven")]) == 1
        (small,) = a.acquire(NS, [key(7)])
        assert (small.length, bytes(a.view(small.slot)[:small.length])) == (5, b"seven")
        a.release([small.slot])
        assert kv.stats()[NS]["memory"].bytes == 3 * SLOT + 5
        assert handle.store.tier("memory").slab.num_free == 4


def test_commit_writes_the_named_lower_tiers_and_acquire_promotes_from_them(redis_url):
    tiers = slab(4) + [{"type": "redis", "url": redis_url, "key_prefix": f"slab-{secrets.token_hex(4)}:"}]
    with running_daemon(tiers) as (handle, url), SlabClient(url) as client:
        slots = client.allocate(2)
        for i, slot in enumerate(slots):
            client.view(slot)[:] = payload(i, SLOT)
        sums = [block_checksum(payload(i, SLOT), NS, key(i)) for i in range(2)]
        assert client.commit(NS, [key(0), key(1)], slots, sums, [None, None], tiers=["redis"]) == 2
        assert handle.store.lookup(NS, [key(0), key(1)]).tiers == ["redis", "redis"]
        assert handle.store.tier("memory").slab.num_free == 4    # not indexed, leases ended: free again
        found = client.acquire(NS, [key(0), key(1), key(2)])
        assert [bytes(client.view(f.slot)) for f in found] == [payload(0, SLOT), payload(1, SLOT)]
        assert [f.checksum for f in found] == sums
        client.release([f.slot for f in found])
        assert handle.store.lookup(NS, [key(0), key(1)]).tiers == ["memory", "memory"]   # promoted


def test_without_promotion_blocks_from_below_are_staged_in_slots_only(redis_url):
    tiers = slab(4) + [{"type": "redis", "url": redis_url, "key_prefix": f"slab-{secrets.token_hex(4)}:"}]
    with running_daemon(tiers, promote_on_hit=False) as (handle, url), SlabClient(url) as client:
        handle.store.put(NS, [(key(0), payload(0, SLOT))], tiers=["redis"])
        (found,) = client.acquire(NS, [key(0)])
        assert bytes(client.view(found.slot)) == payload(0, SLOT)
        assert handle.store.tier("memory").slab.num_free == 3
        client.release([found.slot])
        assert handle.store.tier("memory").slab.num_free == 4
        assert handle.store.lookup(NS, [key(0)]).tiers == ["redis"]


def test_eviction_skips_leased_slots_and_writes_the_evicted_down(redis_url):
    tiers = slab(4) + [{"type": "redis", "url": redis_url, "key_prefix": f"slab-{secrets.token_hex(4)}:"}]
    with running_daemon(tiers) as (handle, url), SlabClient(url) as client:
        _write(client, [0, 1, 2, 3])
        held = client.acquire(NS, [key(0), key(1)])
        assert len(held) == 2
        new = client.allocate(4)
        assert len(new) == 2 and not {f.slot for f in held} & set(new)   # only the unleased two
        client.release(new)
        assert [bytes(client.view(f.slot)) for f in held] == [payload(0, SLOT), payload(1, SLOT)]
        _wait(lambda: handle.store.lookup(NS, [key(2), key(3)]).tiers == ["redis", "redis"],
              "the evicted blocks are written down")
        assert handle.store.get(NS, [key(2), key(3)]) == [payload(2, SLOT), payload(3, SLOT)]
        client.release([f.slot for f in held])


def test_a_commit_ttl_rebinds_the_checksum_and_bad_expiries_are_invalid_argument():
    with running_daemon(slab()) as (handle, url), SlabClient(url) as client:
        slots = client.allocate(1)
        client.view(slots[0])[:] = payload(1, SLOT)
        expires_at = time.time() + 600
        checksum = block_checksum(payload(1, SLOT), NS, key(1), expires_at)
        assert client.commit(NS, [key(1)], slots, [checksum], [expires_at], ttl_s=60) == 1
        (block,) = handle.store.get_sealed(NS, [key(1)])
        assert 0 < block.expires_at - time.time() <= 60
        assert block.checksum == block_checksum(payload(1, SLOT), NS, key(1), block.expires_at)
        for ttl_s, expiry, message in [(float("inf"), None, "ttl_s: must be a positive number of seconds"),
                                       (None, float("nan"), "blocks[0].expires_at: must be wall-clock seconds")]:
            slots = client.allocate(1)
            with pytest.raises(KVStoreError) as info:
                client.commit(NS, [key(2)], slots, [0], [expiry], ttl_s=ttl_s)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.details.startswith(message)
        assert handle.store.lookup(NS, [key(2)]).num_hits == 0


def test_bad_handles_are_invalid_argument_and_change_nothing():
    with running_daemon(slab(4), max_keys_per_call=8) as (handle, url), SlabClient(url) as mine, \
            SlabClient(url) as other:
        channel, stub = _stub(url)
        me = mine._session.handle
        _write(mine, [0])
        (acquired,) = mine.acquire(NS, [key(0)])
        theirs = other.allocate(1)
        allocated = mine.allocate(1)

        def commit(*slots):
            blocks = [pb.CommittedSlot(key=key(9), slot=s) for s in slots]
            return lambda: stub.CommitSlots(pb.CommitSlotsRequest(session=me, header=pb.PutHeader(namespace=NS),
                                                                  blocks=blocks))

        def release(*slots):
            return lambda: stub.ReleaseSlots(pb.ReleaseSlotsRequest(session=me, slots=slots))

        cases = [
            (commit(4), "blocks[0].slot: 4 is not a slot of this slab (it has 4)"),
            (commit(theirs[0]), f"blocks[0].slot: slot {theirs[0]} is not allocated to this session"),
            (commit(acquired.slot), f"blocks[0].slot: slot {acquired.slot} is not allocated to this session"),
            (commit(allocated[0], allocated[0]), f"blocks[1].slot: slot {allocated[0]} is not allocated to this"),
            (release(2**31), f"slots[0]: {2**31} is not a slot of this slab (it has 4)"),
            (release(theirs[0]), f"slots[0]: slot {theirs[0]} is not leased by this session"),
            (release(acquired.slot, acquired.slot), f"slots[1]: slot {acquired.slot} is not leased by this session"),
            (lambda: stub.AllocateSlots(pb.AllocateSlotsRequest(session=me, count=9)),
             "count: 9 slots in one call, the limit (max_keys_per_call) is 8"),
            (release(*range(9)), "slots: 9 slots in one call, the limit (max_keys_per_call) is 8"),
            (lambda: stub.AcquireSlots(pb.AcquireSlotsRequest(session=me, namespace=NS, keys=[b""])),
             "keys[0]: must not be empty"),
        ]
        for call, message in cases:
            code, details = _status(call)
            assert (code, details[:len(message)]) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        # Nothing moved: the leases are where they were and still work.
        slab_index = handle.store.tier("memory").slab
        assert slab_index.num_free == 1
        mine.release([acquired.slot] + allocated)
        other.release(theirs)
        assert slab_index.num_free == 3 and handle.store.lookup(NS, [key(0), key(9)]).num_hits == 1
        channel.close()


def test_unknown_sessions_wrong_nonces_and_daemons_without_a_slab_are_failed_precondition():
    with running_daemon(slab()) as (_, url), SlabClient(url) as client:
        channel, stub = _stub(url)
        good = client._session.handle
        for handle, message in [(pb.SlabHandle(session_id="0" * 32, nonce=good.nonce), "session_id: unknown slab"),
                                (pb.SlabHandle(session_id=good.session_id, nonce=b"x" * 16), "session.nonce: not this")]:
            code, details = _status(lambda: stub.AllocateSlots(pb.AllocateSlotsRequest(session=handle, count=1)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(message)
        channel.close()
    with running_daemon([{"type": "memory", "bytes": "1MiB"}]) as (_, url):
        with pytest.raises(SlabRefused, match="AttachSlab: FAILED_PRECONDITION: this daemon has no slab"):
            SlabClient(url)


def test_slab_rpcs_need_the_token_and_sessions_are_bounded(monkeypatch):
    monkeypatch.setenv("KVSTORE_SLAB_TOKEN", TOKEN)
    with running_daemon(slab(), auth_token_env="KVSTORE_SLAB_TOKEN", shm_max_sessions=2) as (handle, url):
        with pytest.raises(SlabRefused, match="UNAUTHENTICATED"):
            SlabClient(url)
        with SlabClient(url, token=TOKEN) as one, SlabClient(url, token=TOKEN):
            channel, stub = _stub(url)
            code, _ = _status(lambda: stub.AllocateSlots(pb.AllocateSlotsRequest(session=one._session.handle)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(SlabRefused, match="RESOURCE_EXHAUSTED: slab sessions: 2 already attached"):
                SlabClient(url, token=TOKEN)
            # Attached sessions hold RPC threads, never the health service's.
            health = health_pb2_grpc.HealthStub(channel)
            started = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 1
            channel.close()
        _wait(lambda: handle.slab.count == 0, "closed clients end their sessions")


def test_a_session_that_ends_releases_its_leases_closed_killed_or_daemon_stopped():
    with running_daemon(slab(4)) as (handle, url):
        slab_index = handle.store.tier("memory").slab
        client = SlabClient(url)
        client.allocate(2)
        _write(client, [0])
        client.acquire(NS, [key(0)])
        assert slab_index.num_free == 1
        client.close()
        _wait(lambda: slab_index.num_free == 3, "closing the client releases its leases")

        script = (f"from kvstore.slab_client import SlabClient\n"
                  f"c = SlabClient({url!r}); print(len(c.allocate(3)), flush=True)\n"
                  f"import time; time.sleep(60)")
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == "3"
        assert slab_index.num_free == 0
        proc.kill()
        proc.wait()
        _wait(lambda: slab_index.num_free == 3 and handle.slab.count == 0, "a killed client's leases are released")
        assert handle.store.get(NS, [key(0)]) == [payload(0, SLOT)]
        client = SlabClient(url)
    _wait(lambda: not client.attached, "the client sees its session end when the daemon stops")
    assert client.allocate(1) == [] and client.acquire(NS, [key(0)]) == []
    client.close()


def test_a_client_re_attaches_to_a_restarted_daemon_at_the_same_address(monkeypatch):
    monkeypatch.setattr(slab_client, "REATTACH_S", 0.1)
    cfg = parse_store_config({"listen": f"127.0.0.1:{free_port()}", "tiers": slab()})
    first = serve(cfg, workers=8)
    client = SlabClient(f"grpc://127.0.0.1:{first.port}")
    rows = client.slots
    _write(client, [0])
    held = client.allocate(1)
    first.stop(grace_s=0)
    _wait(lambda: not client.attached, "the session ends with the daemon")
    second = serve(cfg, workers=8)
    try:
        time.sleep(0.5)
        assert not client.attached   # a lease of the old session is still out: no copy may race a remap
        client.release(held)
        _wait(lambda: client.attached, "the client re-attaches", timeout=20)
        assert client.slots is rows
        _write(client, [1])
        (found,) = client.acquire(NS, [key(1)])
        assert bytes(rows[found.slot * SLOT:(found.slot + 1) * SLOT]) == payload(1, SLOT)
        client.release([found.slot])
        assert second.store.lookup(NS, [key(0), key(1)]).num_hits == 0   # key 0 went with the first daemon
        assert second.store.get(NS, [key(1)]) == [payload(1, SLOT)]
    finally:
        client.close()
        second.stop(grace_s=0)


def test_the_segment_lives_as_long_as_the_daemon_and_a_killed_daemons_is_removed(tmp_path):
    before = set(os.listdir(SHM))
    with running_daemon(slab()) as (handle, _):
        name = handle.store.tier("memory").segment.name
        assert name in os.listdir(SHM) and (SHM / name).stat().st_mode & 0o777 == 0o600
    assert name not in os.listdir(SHM)

    config = tmp_path / "kvstore.yaml"
    config.write_text(yaml.safe_dump({"tiers": slab()}))
    command = [sys.executable, "-m", "kvstore.cli", "serve", "--config", str(config), "--port", "0"]
    killed = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert "serving on" in killed.stdout.readline()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (stale,) = set(os.listdir(SHM)) - before
    with running_daemon(slab()) as (handle, _):
        assert stale not in os.listdir(SHM)   # the next daemon removed what SIGKILL left


def test_a_slab_larger_than_dev_shm_fails_at_start_naming_the_key(tmp_path):
    room = os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize
    tiers = [{"type": "memory", "bytes": 2 * room, "slot_bytes": "1MiB"}]
    with pytest.raises(ConfigError) as info:
        with running_daemon(tiers):
            pass
    assert str(info.value).startswith("tiers.0.memory.bytes: /dev/shm has no room for a ")
    assert "--shm-size" in str(info.value)
    config = tmp_path / "kvstore.yaml"
    config.write_text(yaml.safe_dump({"tiers": tiers}))
    result = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "tiers.0.memory.bytes: /dev/shm has no room" in result.stderr


def test_slot_bytes_is_validated_naming_the_key():
    for tiers, message in [([{"type": "memory", "bytes": "1MiB", "slot_bytes": "2MiB"}],
                            "tiers.0.memory.slot_bytes: must be at most bytes"),
                           ([{"type": "memory", "slot_bytes": 0}], "tiers.0.memory.slot_bytes: Input should be"),
                           ([{"type": "redis"}, {"type": "memory", "slot_bytes": "1MiB"}],
                            "tiers.1.memory.slot_bytes: only the first tier may be a slab")]:
        with pytest.raises(ConfigError, match=message):
            parse_store_config({"tiers": tiers})


def test_payload_blocks_larger_than_a_slot_go_below(redis_url):
    tiers = slab(4) + [{"type": "redis", "url": redis_url, "key_prefix": f"slab-{secrets.token_hex(4)}:"}]
    with running_daemon(tiers) as (handle, url), KVStoreClient(url) as kv:
        big = payload(5, 3 * SLOT)
        assert kv.put(NS, [(key(5), big)]) == 1
        assert handle.store.lookup(NS, [key(5)]).tiers == ["redis"]
        assert kv.get(NS, [key(5)]) == [big]
        assert kv.get_sealed(NS, [key(5)]) == [SealedBlock.seal(big, NS, key(5))]


def test_bench_measures_the_slab_beside_payloads(tmp_path, capsys):
    from kvstore.cli import main

    out = tmp_path / "bench.json"
    with running_daemon(slab(16), promote_on_hit=False) as (_, url):
        assert main(["bench", "--url", url, "--shm", "--block-sizes", f"16KiB,{SLOT}", "--blocks", "4",
                     "--batch", "2", "--json", str(out)]) == 0
    rows = [(r["mode"], r["tier"], r["block_bytes"], r["bad_blocks"]) for r in json.loads(out.read_text())]
    assert rows == [("daemon", "memory", 16 << 10, 0), ("daemon", "memory", SLOT, 0),
                    ("daemon-slab", "memory", SLOT, 0)]
    assert "| daemon-slab | memory | 64 KiB | 4 x 2 |" in capsys.readouterr().out
    with running_daemon() as (_, url):
        assert main(["bench", "--url", url, "--shm", "--block-sizes", "64KiB", "--blocks", "2"]) == 2
    assert "--shm: the daemon's slab cannot be used (AttachSlab: FAILED_PRECONDITION" in capsys.readouterr().err
    assert main(["bench", "--shm", "--block-sizes", "64KiB", "--blocks", "2"]) == 2
    assert "--shm measures the slab of a daemon on this host: give --url" in capsys.readouterr().err


def test_blocks_engines_commit_to_the_slab_show_in_the_tier_gauges_without_a_stats_call():
    with running_daemon(slab(), metrics_port=0) as (handle, url), SlabClient(url) as client:
        _write(client, [0, 1, 2])

        def held() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=10).read()
            return {s.name: s.value for family in text_string_to_metric_families(text.decode())
                    for s in family.samples if s.labels.get("tier") == "memory" and s.name in
                    ("kvstore_tier_blocks", "kvstore_tier_bytes")}

        assert held() == {"kvstore_tier_blocks": 3, "kvstore_tier_bytes": 3 * SLOT}
