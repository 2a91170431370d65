"""The one error type media loading and prompt building raise for a bad input."""


class MediaError(ValueError):
    """An image, video or multimodal prompt cannot be used; the message names the input at fault."""
