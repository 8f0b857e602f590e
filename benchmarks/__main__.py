"""``python -m benchmarks --suite quick|full [--device cpu|gpu] [--out DIR]``.

See ``benchmarks/suite.py`` for what is measured and how, and ``--help``.
"""

import argparse
import os

# Choose the JAX platform before anything imports JAX and initializes a backend.
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--device", choices=("cpu", "gpu"), default=None)
_device = _pre.parse_known_args()[0].device
if _device is not None:
    os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[_device]

from benchmarks.suite import main  # noqa: E402

main()
