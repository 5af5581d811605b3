"""The Provider Pool coordinator: directory, routing, relay, accounts."""

__version__ = "0.1.0"
