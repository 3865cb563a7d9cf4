"""Everything that runs inside a Ray worker: data, networks, training loop, Gram metrics.

Pure torch (plus pydantic for the run contract) except :mod:`worker.task`, the thin Ray
wrapper. Never imports ``services`` or ``api``.
"""
