"""Cluster configurations and the local multi-node setup (later issues)."""
