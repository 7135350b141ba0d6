"""Memory reuse while methods run: big buffers come from the heap, not a fresh mapping each time."""

import contextlib
import ctypes
import resource

import pytest
import torch

from knowmri import runtime


def _faults_of_allocations(n: int = 6, mib: int = 64) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        x = torch.empty(mib * 2**18)  # float32: mib MiB
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


_PR_SET_THP_DISABLE, _PR_GET_THP_DISABLE = 41, 42


@contextlib.contextmanager
def _small_pages():
    """Transparent huge pages off for this process, so a page fault is one 4 KiB page and counts are exact."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0)
    if before < 0 or libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_THP_DISABLE) is not available")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_THP_DISABLE, before, 0, 0, 0)


@pytest.mark.skipif(not runtime.malloc_tuning_enabled(), reason="glibc only (or turned off)")
def test_big_buffers_are_reused_inside():
    pages = 64 * 2**20 // resource.getpagesize()
    with _small_pages():
        outside = _faults_of_allocations()
        with runtime.reuse_freed_memory():
            _faults_of_allocations(12)  # the heap grows until freed chunks fit the requests
            inside = _faults_of_allocations()
    assert outside > 5 * pages  # every allocation mapped and faulted afresh
    assert inside < outside / 2  # mostly reused
    assert runtime._depth == 0


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))


def test_reentrant_and_restored(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: fake)
    monkeypatch.delenv("KNOWMRI_MALLOC_TUNING", raising=False)
    with runtime.reuse_freed_memory():
        with runtime.reuse_freed_memory():
            assert runtime._depth == 2
        assert ("trim", 0) not in fake.calls  # the outer run still holds the settings
    assert fake.calls[: len(runtime._DURING)] == list(runtime._DURING.items())
    assert fake.calls[len(runtime._DURING):] == [*runtime._DEFAULTS.items(), ("trim", 0)]
    assert runtime._depth == 0


def test_turned_off_by_environment(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: fake)
    monkeypatch.setenv("KNOWMRI_MALLOC_TUNING", "0")
    assert not runtime.malloc_tuning_enabled()
    with runtime.reuse_freed_memory():
        pass
    assert fake.calls == []


def test_restored_after_an_error(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: fake)
    monkeypatch.delenv("KNOWMRI_MALLOC_TUNING", raising=False)
    with pytest.raises(RuntimeError), runtime.reuse_freed_memory():
        raise RuntimeError("boom")
    assert fake.calls[-1] == ("trim", 0) and runtime._depth == 0
