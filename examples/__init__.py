"""Example plugins and configs for kotlin-smtp-py (loaded by the test suite)."""
