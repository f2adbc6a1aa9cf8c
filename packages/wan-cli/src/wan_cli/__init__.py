"""The ``wan`` command over the Wan 2.1 stack (generate, download, models, info, convert)."""
