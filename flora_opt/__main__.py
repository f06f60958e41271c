"""``python -m flora_opt``: the ``flora-opt`` command (see ``flora_opt.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
