"""overparam: the Python client (httpx) and the ``overparam`` CLI, which talk to the service
over HTTP only, and :mod:`overparam.ntk`, the empirical NTK of your own torch model.

Installed alone (``pip install ./client``) it needs httpx, typer, rich and PyYAML; torch only
for :mod:`overparam.ntk` (imported when called), the server (``overparam-server``) only for
``overparam serve``, ``dispatch``, ``db`` and ``admin``.
"""

from . import ntk
from .client import OverparamClient, OverparamError

Client = OverparamClient

__all__ = ["Client", "OverparamClient", "OverparamError", "ntk"]
__version__ = "0.1.0"
