"""Random weights drawn by torch on a device (the GPU when there is one) and streamed into
safetensors files, for checkpoints too large to draw on the host in time (the 32B shape: ~65 GB).

Each tensor is drawn from torch's generator on `device`, seeded by (seed, tensor name), with the
same value law as `builder.random_tensor` (uniform, zero mean, the given standard deviation; norm
weights 1 + U(+-0.17)). It then goes to the file in pieces through a few pinned host buffers while
other pieces are written (`os.pwrite` releases the GIL), so the build runs at the speed of the
host's page cache. The files are standard safetensors (8-byte header length, JSON header padded
with spaces to 8 bytes, tensors back to back) and load through the normal loader. Values are the
same on every run with the same torch and device kind; they differ from the numpy build's.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_PIECE = 128 << 20  # bytes per host buffer
_BUFFERS = 6  # host buffers in flight (pieces being written while the next is copied)


def draw(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, std: float,
         device: torch.device) -> torch.Tensor:
    """The values of tensor `name` (flat, on `device`)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    numel = 1
    for n in shape:
        numel *= n
    from vattn_ray.model.builder import scale_uniform  # builder imports this module lazily too

    t = torch.rand(numel, generator=gen, device=device, dtype=torch.float32)
    return scale_uniform(t, name, std).to(dtype)


def header_bytes(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> tuple[bytes, list[int]]:
    """The safetensors header of `entries` (name, shape) stored back to back in that order, and
    each tensor's byte offset in the data section."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, at = [], 0
    for name, shape in entries:
        n = itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        offsets.append(at)
        at += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, offsets


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)  # may write less than asked (Linux caps one call at ~2 GiB)
        view, offset = view[done:], offset + done


def write_shards(out_dir: str, shapes: dict[str, tuple[int, ...]], shards: list[list[str]],
                 file_names: list[str], seed: int, dtype: torch.dtype, std: float,
                 device: str | torch.device) -> int:
    """Write every shard file; returns the total bytes of tensor data."""
    device = torch.device(device)
    pin = device.type == "cuda"
    buffers = [torch.empty(_PIECE, dtype=torch.uint8, pin_memory=pin) for _ in range(_BUFFERS)]
    arrays = [b.numpy() for b in buffers]
    busy: list[Future | None] = [None] * _BUFFERS
    turn, total = 0, 0
    with ThreadPoolExecutor(_BUFFERS, thread_name_prefix="ckpt-write") as pool:
        for fname, names in zip(file_names, shards):
            head, offsets = header_bytes([(n, shapes[n]) for n in names], dtype)
            fd = os.open(os.path.join(out_dir, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, memoryview(head), 0)
                for name, start in zip(names, offsets):
                    raw = draw(name, shapes[name], seed, dtype, std, device).view(torch.uint8)
                    for piece in range(0, raw.numel(), _PIECE):
                        n = min(_PIECE, raw.numel() - piece)
                        if busy[turn] is not None:
                            busy[turn].result()  # that buffer's last piece is on its way to the file
                        buffers[turn][:n].copy_(raw[piece:piece + n])
                        busy[turn] = pool.submit(_pwrite_all, fd, memoryview(arrays[turn][:n]),
                                                 len(head) + start + piece)
                        turn = (turn + 1) % _BUFFERS
                    total += raw.numel()
                for i, fut in enumerate(busy):  # this file's pieces are all written before it closes
                    if fut is not None:
                        fut.result()
                        busy[i] = None
            finally:
                os.close(fd)
    return total
