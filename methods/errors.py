"""Errors raised by compression methods."""


class OptionError(ValueError):
    """An option that a layer cannot take, or a method used without what it needs."""
