"""Memory reuse while methods run: big buffers come from the heap, not a fresh mapping each time."""

import json
import os
import resource
import subprocess
import sys

import pytest

from knowmri import runtime

# Run in a fresh interpreter: the heap an earlier test leaves behind (free chunks in glibc's bins,
# pages resident or not) decides whether an allocation outside the context faults afresh, so the
# comparison is only meaningful from a known heap state. Transparent huge pages are turned off
# (prctl PR_SET_THP_DISABLE) so that one fault is one 4 KiB page and the counts are exact.
_MEASURE = """
import ctypes, json, resource, sys
import torch
from knowmri import runtime

def faults(n=6, mib=64):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        x = torch.empty(mib * 2**18)  # float32: mib MiB
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(41, 1, 0, 0, 0) != 0:  # PR_SET_THP_DISABLE
    print(json.dumps(None)); sys.exit()
outside = faults()
with runtime.reuse_freed_memory():
    faults(12)  # the heap grows until freed chunks fit the requests
    inside = faults()
print(json.dumps({"outside": outside, "inside": inside, "depth": runtime._depth}))
"""


@pytest.mark.skipif(not runtime.malloc_tuning_enabled(), reason="glibc only (or turned off)")
def test_big_buffers_are_reused_inside():
    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KNOWMRI_MALLOC_TUNING": "1"})
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    if counts is None:
        pytest.skip("prctl(PR_SET_THP_DISABLE) is not available")
    pages = 64 * 2**20 // resource.getpagesize()
    assert counts["outside"] > 5 * pages  # every allocation mapped and faulted afresh
    assert counts["inside"] < counts["outside"] / 2  # mostly reused
    assert counts["depth"] == 0


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
