"""nanoseek.allocator: freed blocks are kept for reuse, so repeated large allocations stop faulting
fresh pages in (measured with the process's minor page-fault count, in fresh interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from nanoseek.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a training step's pattern: the same large blocks allocated, touched, freed
    a, b = torch.ones(6 << 18), torch.ones(40 << 18)  # 6 and 40 MB
    c = torch.ones(12 << 18)
    del a, b, c
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(mode: str, **env: str) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=environment, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    applied, kept = run("keep")
    _, plain = run("plain")
    assert applied == "True"
    assert kept < plain / 3, (kept, plain)  # ~36,000 against ~230,000 here


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_user_tuned_malloc_is_left_alone():
    applied, _ = run("keep", MALLOC_ARENA_MAX_="2")
    assert applied == "False"
