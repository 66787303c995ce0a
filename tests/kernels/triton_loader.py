"""Loads Triton kernel modules for tests: compiled on a CUDA machine, else in Triton's CPU interpreter.

``triton.jit`` chooses interpreter or compiler when a decorator runs — Triton's own library
functions (``tl.sum``, ``tl.zeros``...) included, which are decorated when ``triton`` is first
imported. So if another test imported triton without TRITON_INTERPRET=1, triton's Python modules
(not its C extension, which cannot be loaded twice) are imported afresh here, and so is the kernel
module. Modules that imported triton earlier keep their own objects.
"""

import importlib
import os
import sys
from types import ModuleType

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl

    return isinstance(tl.sum, InterpretedFunction)


def _reimport_triton() -> None:
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        if not name.startswith("triton._C"):
            del sys.modules[name]
    importlib.import_module("triton")


def load_triton_module(module_name: str) -> ModuleType:
    """Import ``module_name``; without CUDA its kernels (and triton's library) run interpreted on CPU."""
    if DEVICE == "cuda":
        return importlib.import_module(module_name)
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules and not _triton_is_interpreted():
        _reimport_triton()
    module = importlib.import_module(module_name)
    import triton

    if getattr(module, "triton", triton) is not triton:
        module = importlib.reload(module)
    return module
