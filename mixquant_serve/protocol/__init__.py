"""Typed messages and ZMQ channels between the router and the workers (no torch here)."""
