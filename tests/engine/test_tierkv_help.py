"""`tierkv --help` lists the commands and `--version` prints the package version, both exiting 0."""

import subprocess
import sys
from importlib.metadata import version

import pytest

from engine.cli import main


def tierkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_command_and_benchmark(flag):
    proc = tierkv(flag)
    assert proc.returncode == 0, proc.stderr
    for word in ("generate", "serve", "bench", "throughput", "latency", "offload", "--version",
                 "tierkv <command> --help"):
        assert word in proc.stdout, word


def test_version_prints_the_installed_package_version():
    proc = tierkv("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tierkv {version('tierkv')}"


def test_help_and_version_do_not_import_torch():
    script = ("import sys\nfrom engine.cli import main\n"
              "for flag in ('--help', '--version'):\n"
              "    try:\n        main([flag])\n    except SystemExit as e:\n        assert e.code == 0\n"
              "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_no_command_prints_the_summary_and_exits_2(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_command_help_still_reaches_the_command():
    proc = tierkv("generate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--prompt" in proc.stdout
