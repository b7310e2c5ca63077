"""Thin clients of the daemon. Imports nothing heavier than the standard library, pyzmq and msgpack."""

from .client import Client, ClientError, DaemonUnreachable, JobCancelled, JobFailed, RequestFailed, Subscription, WaitTimeout

__all__ = ["Client", "ClientError", "DaemonUnreachable", "JobCancelled", "JobFailed", "RequestFailed", "Subscription",
           "WaitTimeout"]
