"""Thin clients of the daemon. Imports nothing heavier than the standard library, pyzmq and msgpack."""
