"""``python tools/import_weights.py ...`` is ``xemogpt-import ...``: see :mod:`xemogpt_jax.import_weights`."""

import sys

from xemogpt_jax.import_weights import cli

if __name__ == "__main__":
    sys.exit(cli())
