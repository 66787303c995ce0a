"""`kvstore --help` / `--version` exit 0 with a summary and the version; gen-proto says how to get grpc-tools."""

import subprocess
import sys
from importlib.metadata import version

from kvstore.cli import main
from kvstore.proto.kvstore_pb2_grpc import GRPC_GENERATED_VERSION


def kvstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True, timeout=60)


def test_help_lists_every_command():
    proc = kvstore("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("serve", "bench", "gen-proto", "--version", "kvstore <command> --help"):
        assert word in proc.stdout, word


def test_version_prints_the_installed_package_version():
    proc = kvstore("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kvstore {version('tierkv')}"


def test_gen_proto_without_grpc_tools_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpc_tools", None)  # import of grpc_tools raises ModuleNotFoundError
    assert main(["gen-proto"]) == 2
    assert f"pip install grpcio-tools=={GRPC_GENERATED_VERSION}" in capsys.readouterr().err
