"""The machine as a job uses it: cores, and handing freed C heap memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from geoseg.io.workers import cpu_cores, default_workers, release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_default_workers_is_between_one_and_four_and_never_above_the_cores():
    assert 1 <= default_workers() <= min(4, cpu_cores())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_release_freed_memory_gives_the_heap_pages_that_c_code_freed_back():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("not glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # below glibc's mmap threshold: from the heap, as ONNX Runtime's small allocations are
    blocks = [libc.malloc(block) for _ in range(640)]  # 40 MB
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, block)
    for b in blocks[:-1]:  # the last one stays, so that the freed space is not at the heap's top
        libc.free(b)
    before = _rss_mb()
    assert release_freed_memory()
    after = _rss_mb()
    libc.free(blocks[-1])
    assert before - after > 30
