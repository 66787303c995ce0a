"""The checked-in gRPC code in kvstore/proto/ is exactly what protos/kvstore.proto generates."""

from pathlib import Path

from kvstore.proto import GENERATED_FILES, generate


def test_generated_code_matches_proto(tmp_path: Path):
    fresh_dir = generate(tmp_path)
    checked_in_dir = Path(__file__).resolve().parents[2] / "kvstore" / "proto"
    stale = [name for name in GENERATED_FILES
             if (fresh_dir / name).read_bytes() != (checked_in_dir / name).read_bytes()]
    assert stale == [], f"kvstore/proto/{stale} is stale: run `kvstore gen-proto` and commit the result"
