"""The progress bar of long encodes and index writes: tqdm where asked for and installed, else nothing.

tqdm is optional (the ``convert`` extra): an app that ships only the runtime gets no bar, never an
ImportError.
"""

from __future__ import annotations

from collections.abc import Callable

# update(n, close=False): n more items done; close=True ends the bar.
Progress = Callable[..., None]


def progress_bar(total: int, enabled: bool, unit: str = "text") -> Progress:
    """An ``update(n, close=False)`` callable over ``total`` items: a tqdm bar, or a no-op."""
    if not enabled:
        return _nothing
    try:
        from tqdm import tqdm
    except ImportError:
        return _nothing
    bar = tqdm(total=total, unit=unit)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return update


def _nothing(n: int, close: bool = False) -> None:
    return None
