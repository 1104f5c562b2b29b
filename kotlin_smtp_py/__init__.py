"""kotlin-smtp-py: a production mail transfer agent on Twisted."""

__version__ = "0.1.0"
