"""The model argument of `tierkv serve` and `tierkv generate`, checked before anything loads.

Users coming from vLLM pass a Hub id (`Qwen/Qwen3-0.6B`); tierkv loads only local files, so such an
argument gets one line saying so and what is accepted, instead of a traceback from deep in the loader.
"""

from __future__ import annotations

import os

from engine.server.args import ConfigError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"


def pick_model(positional: str | None, flag: str | None) -> str | None:
    """The model given as the positional argument or as --model (vLLM takes both); not yet checked."""
    if positional is not None and flag is not None and positional != flag:
        raise ConfigError(f"the model is given twice, as {positional!r} and as --model {flag!r}; give it once")
    return flag if flag is not None else positional


def check_model_arg(model: str | None) -> None:
    """Raise ConfigError, naming `model` and what is accepted, unless it resolves to a loadable path."""
    from engine.models.config import resolve_model_path   # imports torch: only once a command runs

    if model is not None and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(
            f"model {model!r} is not a local directory or .gguf file, and tierkv does not download from the "
            "Hugging Face Hub: pass a local HF model directory (config.json and weights) or a .gguf file, or "
            f"leave the model out for the embedded {EMBEDDED_MODEL}")
    try:
        resolve_model_path(model)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
