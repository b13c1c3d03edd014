"""creditledger: the shared core of the project (settings, errors, the CLI).

Business packages live beside it: ``streams`` (how events travel), ``agents``
(the ledger fold), ``projections``, ``llm_proxy`` and ``stack`` (the local
services launcher).
"""
