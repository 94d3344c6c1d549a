"""`PagedWeights`: each decoder layer's parameters live on physical pages of `DevicePages`.

Every layer gets its own reserved virtual range; its parameters are views into it, so the model's
modules are unchanged. Dropping a layer unmaps its pages and frees them (the KV cache may then take
them); restoring takes free pages, maps them at the same addresses (the parameter views stay valid)
and refills them, here from a peer that kept the layer (`vattn_ray/elastic/stage.py`).

A dropped layer's range is unmapped: touching it faults on CPU (HostVMM) and is an illegal address
on the GPU, so running a layer that is not resident cannot go unnoticed.
Embeddings, the final norm and the LM head stay in ordinary memory: every stage keeps them.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vattn_ray.elastic.pages import DevicePages

ALIGN = 256  # bytes: every parameter starts aligned for vectorised kernels


def layer_holder(layer: int) -> str:
    return f"layer.{layer}"


class PagedWeights:
    """The decoder layers of `model`, moved onto pages of `pages` (one virtual range per layer)."""

    def __init__(self, layers: nn.ModuleList, pages: DevicePages) -> None:
        self.pages = pages
        self.memory = mem = pages.memory
        self.page_bytes = mem.page_bytes
        self.num_layers = len(layers)
        self.used_bytes: list[int] = []
        self.range_bytes: list[int] = []
        self.bases: list[int] = []
        self.page_ids: list[list[int]] = []  # per layer; empty while dropped
        self._params: list[list[tuple[nn.Parameter, int]]] = []  # (parameter, byte offset)
        self.digests: list[tuple[int, int]] = []
        for i, layer in enumerate(layers):
            self._place(i, layer)
            if mem.device.type == "cuda":
                torch.cuda.empty_cache()  # the layer's original memory goes back before the next one
        self.digests = [self.digest(i) for i in range(self.num_layers)]

    def _place(self, index: int, layer: nn.Module) -> None:
        params, offset = [], 0
        for p in layer.parameters():
            offset = -(-offset // ALIGN) * ALIGN
            params.append((p, offset))
            offset += p.numel() * p.element_size()
        size = max(self.page_bytes, -(-offset // self.page_bytes) * self.page_bytes)
        base = self.memory.reserve(size)
        self.used_bytes.append(offset)
        self.range_bytes.append(size)
        self.bases.append(base)
        self._params.append(params)
        self.page_ids.append([])
        self.pages.create(size // self.page_bytes)
        self._map(index)
        for p, off in params:
            view = self.memory.wrap(base + off, tuple(p.shape), tuple(p.stride()), p.dtype)
            view.copy_(p.data)
            p.data = view  # the module keeps its Parameter; only the storage moves

    @property
    def pages_per_layer(self) -> list[int]:
        return [r // self.page_bytes for r in self.range_bytes]

    def resident(self, layer: int) -> bool:
        return bool(self.page_ids[layer])

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """The layer's parameters as one uint8 tensor (what a peer sends to restore it)."""
        return self.memory.wrap_bytes(self.bases[layer], self.used_bytes[layer])

    def _map(self, layer: int) -> None:
        n = self.range_bytes[layer] // self.page_bytes
        ids = self.pages.assign(n, layer_holder(layer))
        base, mem = self.bases[layer], self.memory
        for j, pid in enumerate(ids):
            mem.map(base + j * self.page_bytes, self.pages.handles[pid])
        mem.set_access(base, self.range_bytes[layer])
        self.page_ids[layer] = ids

    def drop(self, layers: list[int]) -> int:
        """Unmap and free the pages of `layers`; returns the pages freed."""
        self.memory.synchronize()  # no kernel may still read them
        freed = 0
        for i in layers:
            if not self.page_ids[i]:
                continue
            self.memory.unmap(self.bases[i], self.range_bytes[i])
            self.pages.free(self.page_ids[i], layer_holder(i))
            freed += len(self.page_ids[i])
            self.page_ids[i] = []
        return freed

    def remap(self, layers: list[int]) -> int:
        """Back `layers` with free pages again (contents undefined until refilled); pages taken."""
        need = sum(self.range_bytes[i] // self.page_bytes for i in layers if not self.page_ids[i])
        if need > self.pages.num_free:
            raise RuntimeError(f"restoring layers {layers} needs {need} pages, {self.pages.num_free} are free")
        for i in layers:
            if not self.page_ids[i]:
                self._map(i)
        return need

    def digest(self, layer: int) -> tuple[int, int]:
        """A checksum of the layer's bytes (sum and position-weighted sum of its int32 words)."""
        raw = self.layer_bytes(layer)
        words = raw[: raw.numel() // 4 * 4].view(torch.int32)
        total = weighted = 0
        chunk = 1 << 24
        for start in range(0, words.numel(), chunk):
            w = words[start:start + chunk].to(torch.int64)
            idx = torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64) % 65521 + 1
            total += int(w.sum())
            weighted += int((w * idx).sum())
        return total, weighted

    def check_integrity(self) -> None:
        """Resident layers hold exactly their original bytes and their pages; dropped ones hold none."""
        for i in range(self.num_layers):
            ids = self.page_ids[i]
            if ids and len(ids) != self.range_bytes[i] // self.page_bytes:
                raise AssertionError(f"layer {i} holds {len(ids)} pages, its range needs "
                                     f"{self.range_bytes[i] // self.page_bytes}")
            if ids and self.digest(i) != self.digests[i]:
                raise AssertionError(f"layer {i}'s weights differ from the ones loaded")

    def holders(self) -> dict[str, list[int]]:
        return {layer_holder(i): list(ids) for i, ids in enumerate(self.page_ids)}

    def close(self) -> None:
        """Unmap every layer and give its range back (pages are released by `DevicePages.close`)."""
        self.drop(list(range(self.num_layers)))
        for base, size in zip(self.bases, self.range_bytes):
            self.memory.free_range(base, size)
        self.bases = []


def timed(fn, *args):
    """(result, seconds) of fn(*args)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
