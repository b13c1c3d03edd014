"""The ledger: a pure fold of commands into entries (domain.py), its state table, the Faust
app and agent that run it, and ops."""
