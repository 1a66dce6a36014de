"""``python tools/export_pytorch.py ...`` is ``xemogpt-export ...``: see :mod:`xemogpt_jax.export_pytorch`."""

import sys

from xemogpt_jax.export_pytorch import main

if __name__ == "__main__":
    sys.exit(main())
