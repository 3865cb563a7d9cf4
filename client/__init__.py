"""The Python client (httpx) and the ``overparam`` CLI; they talk to the service over HTTP only."""

from client.client import OverparamClient, OverparamError

__all__ = ["OverparamClient", "OverparamError"]
