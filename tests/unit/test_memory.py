"""malloc tuning: a process that keeps cycling through a few 256 KiB buffers (a socket read and
the framing's copies of it) must not hand their memory back and fault it in again each time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CYCLE = """
import resource, sys
from kotlin_smtp_py.memory import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else None
def cycle():
    pieces = [bytes(262144) for _ in range(4)]  # like a read, its copies, and the next read
    del pieces
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    cycle()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CYCLE, mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_buffers_are_kept_instead_of_faulted_in_again() -> None:
    tuned, tuned_faults = faults("tune")
    _, plain_faults = faults("plain")
    assert tuned == "True"
    # Untuned, every cycle returns the memory and faults it in again (64 pages a buffer).
    assert plain_faults > 200 * 64
    assert tuned_faults < plain_faults / 20


def test_operator_malloc_settings_win() -> None:
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="131072")
    tuned, _ = faults("tune", env)
    assert tuned == "False"
