"""The diffusiond server process, by concept: engine/, models/, coreml/ and service/ (docs/architecture.md)."""
