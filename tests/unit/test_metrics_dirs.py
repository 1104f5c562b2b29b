"""A SIGKILLed parent leaves its metrics directory behind; the next start removes it, and
only it: never a live process's directory, another user's, or one whose owner is unknown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kotlin_smtp_py.workers import METRICS_DIR_PREFIX, remove_stale_metrics_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid  # reaped: no process has it (until reused, which would keep the dir)


def test_only_dirs_of_gone_parents_are_removed(tmp_path: Path) -> None:
    gone = tmp_path / f"{METRICS_DIR_PREFIX}{_dead_pid()}-abc"
    live = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-def"
    unnamed = tmp_path / f"{METRICS_DIR_PREFIX}xyz123"  # an older, unnamed one
    other = tmp_path / "something-else"
    for d in (gone, live, unnamed, other):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")
    assert remove_stale_metrics_dirs(str(tmp_path)) == 1
    assert not gone.exists()
    assert live.exists() and unnamed.exists() and other.exists()
