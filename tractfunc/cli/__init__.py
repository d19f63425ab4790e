"""The command line (``tractfunc ...``, ``python -m tractfunc.cli``): a thin layer over the library.
Nothing in the package imports it.

  commands   the subcommands and their parser
  local      the DIPY-style `track --algorithm` driver
  args       argparse without abbreviations, the subcommand's usage on errors, numeric option ranges
  outputs    what each command reads and writes; --force and the output checks made before any work
  preflight  track's seed/streamline limits and whether any seed can reach the FOD and the mask
  header     the .tck header of ``track`` in tckgen's keys and formats
"""


def main(argv=None):
    from .commands import main as _main
    return _main(argv)
