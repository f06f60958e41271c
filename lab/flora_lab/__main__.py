"""``python -m flora_lab``: the ``flora-lab`` command (see ``flora_lab.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
