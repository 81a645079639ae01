"""``python -m slcompile``: the ``slcompile`` command line."""

from slcompile.cli import main

if __name__ == "__main__":
    main(prog_name="slcompile")
