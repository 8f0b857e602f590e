"""The progress bar between compiled chunks: tqdm's, in a terminal or a notebook."""

from __future__ import annotations

import sys


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def progress_default() -> bool:
    """Whether to show a bar when the caller says ``progress=None``.

    On when stderr is a terminal or in a Jupyter kernel, off otherwise (a
    log file or CI would fill with carriage returns).
    """
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or _in_notebook()


def make_bar(progress: bool, total: int, desc: str):
    """A ``tqdm.auto`` bar of ``total`` steps (a widget in notebooks), or None."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")
