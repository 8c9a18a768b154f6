"""Mesh construction and logical-axis sharding rules."""
