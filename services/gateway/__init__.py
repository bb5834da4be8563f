"""The gateway: the suite's only public entry (OpenAI-compatible HTTP and gRPC Generate)."""
