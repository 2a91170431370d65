"""The one error type every checkpoint reader and writer raises for a bad input."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message names the file, tensor or field at fault."""
