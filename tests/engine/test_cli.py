"""The README's first command answers with the embedded default model."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tierkv_generate_answers_paris():
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--prompt",
                           "What is the capital of France?"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
