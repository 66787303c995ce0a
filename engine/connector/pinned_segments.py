"""Shared-memory mappings registered with CUDA as pinned memory, so transfers DMA straight into them.

The engine maps the same-host daemon's slab (kvstore/slab_client.py). Registering the mapping with
`cudaHostRegister` makes the connector's device-to-host copies of saved blocks and host-to-device
copies of loaded ones run asynchronously at full PCIe speed (pinned: 55 GB/s measured on the H100
against 12 GB/s pageable) directly in the daemon's slots, with no staging copy. Without a GPU there
is nothing to register.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_CUDA_HOST_REGISTER_DEFAULT = 0


class PinnedSegments:
    """Registers mappings as they are made; unregisters one before it is replaced, and all at close.

    The caller unregisters only memory no copy is using: unregistering under a running DMA is undefined.
    """

    def __init__(self) -> None:
        self._views: dict[int, torch.Tensor] = {}   # address -> a view keeping the mapping exported

    def register(self, memory: memoryview) -> None:
        if not torch.cuda.is_available():
            return
        view = torch.frombuffer(memory, dtype=torch.uint8)
        status = torch.cuda.cudart().cudaHostRegister(view.data_ptr(), view.numel(), _CUDA_HOST_REGISTER_DEFAULT)
        if int(status) != 0:
            logger.warning("cudaHostRegister of the %d-byte slab mapping failed (%s); copies use pageable memory",
                           view.numel(), status)
            return
        self._views[view.data_ptr()] = view

    def unregister(self, memory: memoryview) -> None:
        if not torch.cuda.is_available():
            return
        view = self._views.pop(torch.frombuffer(memory, dtype=torch.uint8).data_ptr(), None)
        if view is not None:
            torch.cuda.cudart().cudaHostUnregister(view.data_ptr())

    def close(self) -> None:
        for address in list(self._views):
            torch.cuda.cudart().cudaHostUnregister(address)
        self._views.clear()
