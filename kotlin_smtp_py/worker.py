"""``python -m kotlin_smtp_py.worker``: an extra SMTP worker process (see :mod:`.workers`)."""

from __future__ import annotations

import sys

from kotlin_smtp_py.workers import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
