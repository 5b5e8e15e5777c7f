"""An anonymous memory mapping reserved but not committed, and what the OS says about it (Linux).

``AnonymousMapping`` reserves address space with ``mmap(MAP_PRIVATE | MAP_ANONYMOUS |
MAP_NORESERVE)``: no physical page exists until one is first written (the kernel then commits a
zeroed page, 4 KiB, or 2 MiB where transparent huge pages apply), and ``MAP_NORESERVE`` keeps the
reservation out of the overcommit heuristic, so a mapping far larger than RAM is accepted.
``release`` gives pages back with ``madvise(MADV_DONTNEED)``: the next touch faults in a zeroed page.
``resident_bytes`` asks the kernel which pages are in memory (``mincore``), the figure tests and
stats compare the KV accounting with; ``huge_page_bytes`` reads ``/proc/self/smaps``.

The mapping lives as long as any tensor made by ``tensor()`` does (torch keeps the Python mmap
alive through the buffer it was made from), so a view can never outlive its memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from pathlib import Path

import torch

# Python < 3.13 does not name it; this is Linux's value on x86-64 and arm64.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_SIZE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


def base_page_bytes() -> int:
    """The OS page size (the granularity of mincore and of a plain page fault)."""
    return mmap.PAGESIZE


def transparent_huge_page_mode() -> str:
    """``always``, ``madvise`` or ``never`` (the bracketed word of the sysfs setting); ``never``
    where the kernel has no transparent huge pages."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "never"


def huge_page_bytes_of_host() -> int:
    """The size of a transparent huge page (2 MiB on x86-64); 0 where there are none."""
    try:
        return int(THP_SIZE.read_text())
    except (OSError, ValueError):
        return 0


def huge_pages_unavailable() -> str | None:
    """None where transparent huge pages can back a mapping here, else why not (for messages)."""
    if transparent_huge_page_mode() == "never" or huge_page_bytes_of_host() == 0:
        return "transparent huge pages are off on this host (/sys/kernel/mm/transparent_hugepage/enabled is 'never')"
    return None


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class AnonymousMapping:
    """``size`` bytes of reserved address space starting at a multiple of ``alignment`` (a power of
    two multiple of the page size). ``huge_pages``: ask for transparent huge pages on it
    (MADV_HUGEPAGE); otherwise forbid them (MADV_NOHUGEPAGE), so that with THP set to ``always`` a
    first touch still commits one base page, not 2 MiB."""

    def __init__(self, size: int, alignment: int | None = None, huge_pages: bool = False):
        page = base_page_bytes()
        alignment = alignment or page
        if size <= 0 or alignment % page or alignment & (alignment - 1):
            raise ValueError(f"size must be positive and alignment a power-of-two multiple of {page}, "
                             f"got {size} and {alignment}")
        self.size = round_up(size, page)
        # Over-reserve so an aligned start exists inside; the slack is never touched.
        self._mmap = mmap.mmap(-1, self.size + alignment - page,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        mapping_start = ctypes.addressof(anchor)
        del anchor  # the buffer export would keep the mmap from ever closing
        self.offset = round_up(mapping_start, alignment) - mapping_start  # where our range starts
        self.address = mapping_start + self.offset
        self.huge_pages = huge_pages
        self._mmap.madvise(mmap.MADV_HUGEPAGE if huge_pages else mmap.MADV_NOHUGEPAGE, self.offset, self.size)

    def tensor(self) -> torch.Tensor:
        """The whole range as a uint8 tensor over the same memory (nothing copied, nothing touched)."""
        return torch.frombuffer(self._mmap, dtype=torch.uint8, count=self.size, offset=self.offset)

    def release(self, start: int, length: int) -> None:
        """Give back the pages of [start, start + length) (start page-aligned): resident no more,
        zero when next touched."""
        if length > 0:
            self._mmap.madvise(mmap.MADV_DONTNEED, self.offset + start, length)

    def resident_bytes(self, start: int = 0, length: int | None = None) -> int:
        """Bytes of [start, start + length) (default: all) that are in memory now, by mincore."""
        page = base_page_bytes()
        length = self.size - start if length is None else length
        if start % page or start < 0 or start + length > self.size:
            raise ValueError(f"range [{start}, {start + length}) is not page-aligned inside the mapping")
        num_pages = -(-length // page)
        if num_pages == 0:
            return 0
        status = (ctypes.c_ubyte * num_pages)()
        if _libc.mincore(ctypes.c_void_p(self.address + start), ctypes.c_size_t(length), status) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        # Bit 0 is residency; the other bits are reserved.
        return int(torch.frombuffer(status, dtype=torch.uint8).bitwise_and(1).sum()) * page

    def huge_page_bytes(self) -> int:
        """AnonHugePages of the memory areas that hold this range, from /proc/self/smaps (the kernel
        may merge an area with a like neighbour, whose huge pages would then count too)."""
        total, inside = 0, False
        end = self.address + self.size
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split(maxsplit=1)[0] if line else ""
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low < end and high > self.address
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
        return total
