"""Generated gRPC code for protos/kvstore.proto, and the one command that regenerates it.

Regenerate with `kvstore gen-proto`; tests/kvstore/test_proto_fresh.py
fails when the checked-in files differ from a fresh generation.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_SOURCE = REPO_ROOT / "protos" / "kvstore.proto"
GENERATED_FILES = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")
# The proto is compiled under the virtual path kvstore/proto/ so that the generated stub imports
# `kvstore.proto.kvstore_pb2` as a package module instead of a bare top-level `kvstore_pb2`.
_VIRTUAL_DIR = "kvstore/proto"


def protoc_args(out_root: Path, proto_dir: Path = PROTO_SOURCE.parent) -> list[str]:
    """Arguments for grpc_tools.protoc writing kvstore/proto/*.py under `out_root`."""
    return [
        "grpc_tools.protoc",
        f"-I{_VIRTUAL_DIR}={proto_dir}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        f"{_VIRTUAL_DIR}/{PROTO_SOURCE.name}",
    ]


def generate(out_root: Path = REPO_ROOT) -> Path:
    """Compile protos/kvstore.proto; returns the directory holding the generated files."""
    from grpc_tools import protoc  # a build-time tool: only needed when regenerating

    out_root = Path(out_root)
    (out_root / _VIRTUAL_DIR).mkdir(parents=True, exist_ok=True)
    if protoc.main(protoc_args(out_root)) != 0:
        raise RuntimeError(f"protoc failed to compile {PROTO_SOURCE}")
    return out_root / _VIRTUAL_DIR
