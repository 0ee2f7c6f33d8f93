"""Distributed set-up shared by stages (process groups now; strategy builders later)."""
