"""``python -m fastbp``: the ``fastbp`` command line (see :mod:`fastbp.cli`).

With no command it prints the configuration and how to start; ``python -m fastbp train`` trains
an MLP on the bundled digits; ``python -m fastbp --help`` lists every command.
"""

from fastbp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
