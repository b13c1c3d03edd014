"""The test world, shared by the test suite and the benchmarks: the real stack's parts
started à la carte as process groups, isolated worlds (a database, a Redis prefix, scratch
topics), seeded workloads and the auditors that say what a correct ledger and read models
must hold. It stands on top of the house (it may import anything); nothing imports it but
``tests/`` and ``bench/``."""
