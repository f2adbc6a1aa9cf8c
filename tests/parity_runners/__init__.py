"""Runners that turn a parity case into outputs with our modules, one module per component."""
