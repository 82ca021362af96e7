"""Where work runs: device and dtype resolution, and the torchrun process group, shared by every command."""

from __future__ import annotations

import os

from sightline.errors import UserError

MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str = "auto") -> str:
    """`auto` -> the local rank's CUDA device if any, else `cpu`; an unavailable CUDA device is a UserError."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return str(device)


def resolve_model_dtype(dtype: str = "auto", device: str | None = None, device_map: object = None) -> str:
    """`auto` -> bfloat16 on GPU (a CUDA device or any device_map), float32 on CPU; others are checked."""
    if dtype not in MODEL_DTYPES:
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
        if dtype in aliases:
            return aliases[dtype]
        raise UserError(f"unknown model dtype {dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if (device or "").startswith("cuda") or device_map is not None else "float32"


def resolve_placement(device: str = "auto", dtype: str = "auto", device_map: object = None) -> tuple[str | None, str]:
    """(device, model dtype) for loading a model: device None when `device_map` places it (accelerate)."""
    dev = None if device_map is not None else resolve_device(device)
    return dev, resolve_model_dtype(dtype, dev, device_map)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; initialises torch.distributed when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every rank (no-op on one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): the process that prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0
