"""Progress bars for long jobs (training, streamed importance sampling), quiet off a terminal.

A bar asked for with ``progress=True`` is drawn only when its stream (stderr) is a terminal:
redirected to a log or captured, tqdm's carriage-return updates (one per refresh, thousands
in a long run) would fill the file, so the bar is off there and the job's result is the same.
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable=None, *, progress: bool, desc: str, total=None, initial: int = 0):
    """A ``tqdm`` bar over ``iterable`` (or of ``total`` steps from ``initial``); off when
    ``progress`` is false or stderr is not a terminal (tqdm's ``disable=None``)."""
    return tqdm(
        iterable, desc=desc, total=total, initial=initial, disable=None if progress else True
    )
