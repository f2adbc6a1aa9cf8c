"""Repository tools: scripts and their helpers (not a published package)."""
