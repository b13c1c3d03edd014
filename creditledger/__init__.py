"""The faces, on the top floor: the ``creditledger`` command line, the ledger worker's
supervisor and the demos. They wire the contexts together; nothing imports them (see
the floors in ARCHITECTURE.md)."""
