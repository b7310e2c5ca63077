"""The daemon as a service: server, queue, workers (local and remote), sockets, TCP keys, login services."""
