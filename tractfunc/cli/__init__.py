"""The command line (``tractfunc ...``, ``python -m tractfunc.cli``): a thin layer over the library.
Nothing in the package imports it."""


def main(argv=None):
    from .main import main as _main
    return _main(argv)
