"""``python -m kotlin_smtp_py`` = the ``kotlin-smtp`` operator tool."""

from kotlin_smtp_py.cli import main

raise SystemExit(main())
