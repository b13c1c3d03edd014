"""Pricing, shared by the proxy (it prices calls) and the store (it edits the rules):
the pure price rules (:mod:`pricing.rules`) and where they come from (:mod:`pricing.source`)."""
