"""The one exception type of tractfunc (the bottom layer: every other module may import it)."""


class TractfuncError(ValueError):
    """Bad input: the message says what was wrong and what was expected."""
