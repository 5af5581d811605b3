"""What the coordinator and the provider agent both speak: wire protocol, OpenAI shapes, errors."""
