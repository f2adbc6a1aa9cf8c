"""The error every checkpoint problem is reported as."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the network asked for."""
