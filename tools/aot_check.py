"""``python tools/aot_check.py ...`` is ``xemogpt-aot ...``: see :mod:`xemogpt_jax.aot_check`."""

import sys

from xemogpt_jax.aot_check import main

if __name__ == "__main__":
    sys.exit(main())
