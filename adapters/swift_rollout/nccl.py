"""The NCCL half of server weight sync (stage2.md §16.3.2, §17): the learner joins each server's weight group as
its last rank and broadcasts the flat ``uint8`` buckets.

Written against vLLM's ``StatelessProcessGroup`` / ``PyNcclCommunicator`` and ms-swift 4.6's
``broadcast_tensor_for_vllm_weight_sync``, exactly as ``swift/rlhf_trainers/vllm_client.py`` uses them; needs vLLM
and a CUDA device on the learner (rank 0). Imported lazily: nothing here runs on a CPU-only machine, where
:func:`nccl_available` is False and the client refuses to sync with a clear error.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from domain.errors import SetupError

INIT_GRACE_S = 0.1  # ms-swift's client waits this long after /init_communicator/ before joining


def nccl_available() -> bool:
    """vLLM importable and a CUDA device present (the broadcast is GPU to GPU)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class NcclWeightBroadcaster:
    """One server's weight group, joined as rank ``server_world_size`` of ``server_world_size + 1``."""

    def __init__(self, host: str, group_port: int, server_world_size: int, device: int | str = 0) -> None:
        try:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
        except ImportError as exc:
            raise SetupError(
                f"server weight sync needs vLLM on the learner for the NCCL broadcast ({exc}); install coordexp[vllm]"
            ) from exc
        time.sleep(INIT_GRACE_S)
        group = StatelessProcessGroup.create(
            host=host,
            port=int(group_port),
            rank=int(server_world_size),
            world_size=int(server_world_size) + 1,
        )
        self._communicator: Any = PyNcclCommunicator(group, device=device)

    def broadcast(self, flat_tensor: Any) -> None:
        """Send one bucket to every worker of the server from this (last) rank, then wait for all of them."""
        import torch
        from swift.rlhf_trainers.utils import broadcast_tensor_for_vllm_weight_sync

        communicator = self._communicator
        if communicator is None:
            raise SetupError("the NCCL weight group was closed")
        tensor = flat_tensor.to(device=communicator.device, non_blocking=False)
        with torch.cuda.device(communicator.device):
            broadcast_tensor_for_vllm_weight_sync(communicator, tensor, src=communicator.rank)
            torch.cuda.synchronize(communicator.device)
        communicator.group.barrier()

    def close(self) -> None:
        self._communicator = None


def nccl_broadcaster_factory(device: int | str = 0) -> Any:
    """The client's ``BroadcasterFactory`` for production: ``(index, host, port, world) -> NcclWeightBroadcaster``."""

    def make(index: int, host: str, group_port: int, server_world_size: int) -> NcclWeightBroadcaster:
        return NcclWeightBroadcaster(host, group_port, server_world_size, device)

    return make
