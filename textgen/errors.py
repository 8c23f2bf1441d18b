"""The base class of every error caused by user input: the CLIs print its message and exit 2."""


class TextgenError(ValueError):
    pass
