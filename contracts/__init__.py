"""Contracts shared by every context: field rules (more move here with the floors step)."""
