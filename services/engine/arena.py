"""Host memory for many tensors that are kept together and freed together (the fit's capture cache).

Why not keep the captured tensors themselves: kept tensors interleaved with a pass's transient
ones fragment the allocator, so the transient ones keep landing in fresh memory. On the 2-core
benchmark VMs, whose never-touched memory costs ≈ 2-3 s per GiB on first touch, that made every
later capture of a 1,000-sequence fit 50% slower. The arena copies what is kept into a few large
anonymous mappings, and the pass's transient tensors keep reusing the allocator's warm memory.
(Huge pages were tried and dropped: there each 2 MiB fault cost more than the small faults it
replaced.)

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
