"""tierkv's inference engine. `from engine import LLM, SamplingParams`.

Names are imported on first use so that `import engine.sampling` (or the server's argument
parsing) does not pull in the whole model stack.
"""

from importlib import import_module

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling.params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "EngineConfig": "engine.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
