"""Multi-process metrics know their pid without asking the kernel on every update, and still
write a forked child's values to the child's own file (prometheus_client keys files by pid)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import os, sys
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from kotlin_smtp_py.metrics import _enable_multiprocess
_enable_multiprocess(sys.argv[1])
c = Counter("forked", "x", registry=CollectorRegistry())
c.inc()
child = os.fork()
if child == 0:
    c.inc(10)
    os._exit(0)
os.waitpid(child, 0)
c.inc(100)
total = CollectorRegistry()
MultiProcessCollector(total, path=sys.argv[1])
print(os.getpid(), child, total.get_sample_value("forked_total"))
"""


def test_fork_child_writes_its_own_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    parent, child, total = int(out[0]), int(out[1]), float(out[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{parent}.db", f"counter_{child}.db"])
    assert total == 111.0  # the child's 10 were not written over the parent's values


COUNT_GETPID = """
import os, sys
from prometheus_client import CollectorRegistry, Counter
from kotlin_smtp_py.metrics import _enable_multiprocess
_enable_multiprocess(sys.argv[1])
c = Counter("counted", "x", registry=CollectorRegistry())
calls = []
sys.setprofile(lambda frame, event, arg: calls.append(arg)
               if event == "c_call" and arg is os.getpid else None)
for _ in range(50):
    c.inc()
sys.setprofile(None)
print(len(calls))
"""


@pytest.mark.parametrize("env_at_start", [False, True], ids=["parent", "spawned-worker"])
def test_updates_do_not_ask_the_kernel_for_the_pid(tmp_path: Path, env_at_start: bool) -> None:
    """A spawned worker starts with PROMETHEUS_MULTIPROC_DIR already set, so prometheus_client
    picks its getpid-per-update class at import; ours must replace it there too."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if env_at_start:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", COUNT_GETPID, str(tmp_path)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert int(out) == 0
