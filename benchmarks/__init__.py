"""Benchmarks: ``python -m benchmarks.e2e`` (end to end, optionally against Postfix) and
``python -m benchmarks.micro`` (DATA framing, spool commit). They print figures; they assert
nothing about timings."""
