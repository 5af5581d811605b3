"""pool-agent: serves a local OpenAI-compatible model server to the Provider Pool."""

__version__ = "0.1.0"
