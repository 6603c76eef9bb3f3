"""hipipc.memfd: sealed anonymous memory, the base of the fd transport and memory pools."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import pytest

from hipipc.errors import HipError, hipError_t
from hipipc.memfd import (
    F_ADD_SEALS,
    F_SEAL_WRITE,
    SEALS,
    create_memfd,
    memfd_supported,
    reserve,
    seals_of,
)

pytestmark = pytest.mark.skipif(not memfd_supported(), reason="no sealable memfd on this kernel")


def test_memfd_is_sealed_sized_and_close_on_exec() -> None:
    fd = create_memfd(3 * mmap.PAGESIZE)
    try:
        st = os.fstat(fd)
        assert st.st_size == 3 * mmap.PAGESIZE
        assert st.st_blocks * 512 >= 3 * mmap.PAGESIZE  # committed up front
        assert seals_of(fd) & SEALS == SEALS
        assert not os.get_inheritable(fd)
        assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:hipipc (deleted)"
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, mmap.PAGESIZE, 2 * mmap.PAGESIZE])
def test_nobody_can_shrink_grow_or_reseal(size: int) -> None:
    fd = create_memfd(mmap.PAGESIZE)
    try:
        if size != mmap.PAGESIZE:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
        with pytest.raises(OSError) as info:
            os.posix_fallocate(fd, 0, 2 * mmap.PAGESIZE)  # would grow
        assert info.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == mmap.PAGESIZE
    finally:
        os.close(fd)


def test_uncommitted_pool_reserves_ranges_inside_its_size() -> None:
    fd = create_memfd(64 * mmap.PAGESIZE, commit=False)
    try:
        assert os.fstat(fd).st_blocks == 0
        reserve(fd, 8 * mmap.PAGESIZE, 4 * mmap.PAGESIZE)
        assert os.fstat(fd).st_blocks * 512 == 4 * mmap.PAGESIZE
        with pytest.raises(HipError):  # beyond the sealed size: would grow
            reserve(fd, 63 * mmap.PAGESIZE, 2 * mmap.PAGESIZE)
    finally:
        os.close(fd)


def test_impossible_size_is_out_of_memory_and_leaks_nothing() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for size in (1 << 62, 1 << 70):
        with pytest.raises(HipError) as info:
            create_memfd(size)
        assert info.value.code == hipError_t.hipErrorOutOfMemory
    assert len(os.listdir("/proc/self/fd")) == before
