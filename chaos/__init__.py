"""Fault-tolerance checking for varstack: histories of real calls, and whether they are
linearizable for the per-key register the API promises."""
