"""Host memory for many tensors that are kept together and freed together (the fit's capture cache).

Why not plain tensors: a cache of gigabytes grows the process by that much, and every page is
touched for the first time. On virtual machines that back guest memory lazily (seen on the 2-core
benchmark VMs: ≈ 2 s per GiB of never-touched memory with 4 KiB pages) that first touch costs more
than the arithmetic the cache saves, and kept tensors interleaved with a pass's transient ones
also fragment the allocator. The arena takes memory in large anonymous mappings advised as
transparent huge pages (512× fewer faults where THP is in madvise mode) and hands out slices,
so transient tensors keep reusing the allocator's warm memory.

    arena = HostArena()
    kept = arena.copy(tensor)   # a CPU copy living in the arena
    arena.release()             # every copy becomes invalid; the memory goes back to the system
"""

from __future__ import annotations

import contextlib
import mmap

import torch

_ALIGN = 64  # bytes: a cache line, and enough for every dtype's alignment

class HostArena:
    def __init__(self, chunk_bytes: int = 256 << 20):
        self.chunk_bytes = chunk_bytes
        self._chunks: list[tuple[mmap.mmap, torch.Tensor]] = []
        self._offset = 0
        self.bytes = 0  # bytes handed out

    def _new_chunk(self, size: int) -> None:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._chunks.append((region, torch.frombuffer(region, dtype=torch.uint8)))
        self._offset = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU copy of `tensor` (any device, any dtype) stored in the arena."""
        nbytes = tensor.numel() * tensor.element_size()
        if not self._chunks or self._offset + nbytes > self._chunks[-1][1].numel():
            self._new_chunk(max(self.chunk_bytes, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE))
        memory = self._chunks[-1][1]
        kept = memory[self._offset : self._offset + nbytes].view(tensor.dtype).view(tensor.shape)
        kept.copy_(tensor)
        self._offset += -(-nbytes // _ALIGN) * _ALIGN
        self.bytes += nbytes
        return kept

    def release(self) -> None:
        """Unmap every chunk. Tensors handed out must not be used afterwards."""
        chunks, self._chunks = self._chunks, []
        for region, memory in chunks:
            del memory
            with contextlib.suppress(BufferError):  # a tensor still exports it: unmapped when that goes
                region.close()
        self._offset = self.bytes = 0
