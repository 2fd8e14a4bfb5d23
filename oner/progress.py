"""Progress output that suits where it goes: tqdm bars in a terminal, plain lines in a file.

A log file (`nohup`, CI, a cluster's job log) fills with carriage returns and cursor-movement codes
when tqdm draws into it. `progress(...)` returns a tqdm bar when stdout and stderr are both
terminals, and otherwise a `PlainProgress` with the same interface that writes one plain line to
stdout per event worth a line: each finished item of an outer loop (an evaluation suite), or each
`set_postfix_str` (training's logging steps). Inner loops (`lines=False`) stay silent.
"""

from __future__ import annotations

import sys
import time


def in_terminal() -> bool:
    """True when bars can be drawn: both streams a terminal (tqdm draws on stderr; lines go to stdout)."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def quiet_library_bars() -> None:
    """Turn off the progress bars of the Hugging Face libraries (data set maps, downloads) outside a
    terminal: they draw with tqdm too and have no plain-line mode."""
    if in_terminal():
        return
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    from transformers.utils import logging

    logging.disable_progress_bar()


class PlainProgress:
    """tqdm's interface (iterate, update, set_postfix_str, close) as plain lines on stdout.

    `every_item=True`: a line after each item (outer loops); False: a line at each `set_postfix_str`
    only (training's logging steps, the stages of a build); None: nothing at all.
    """

    def __init__(self, iterable=None, *, desc: str = "", total: int | None = None, unit: str = "it",
                 initial: int = 0, every_item: bool | None = False):
        self.iterable, self.desc, self.unit, self.n = iterable, desc, unit, initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.every_item, self.postfix = total, every_item, ""
        self.start = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every_item:
            self._line()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        if self.every_item is not None:
            self._line()

    def _line(self) -> None:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {count} {self.unit} ({time.monotonic() - self.start:.1f} s){postfix}", flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
             disable: bool = False, lines: bool = True, every_item: bool = True, **tqdm_kwargs):
    """A progress bar over `iterable` (or updated by hand): tqdm in a terminal, plain lines elsewhere.

    Args:
        lines: outside a terminal, write lines at all (False for inner loops: their outer loop reports).
        every_item: outside a terminal, a line per item; False: a line at each `set_postfix_str` only.
        disable: no output anywhere (e.g. not the main process).
        tqdm_kwargs: passed to tqdm in a terminal (`leave`, `dynamic_ncols`, ...).
    """
    if disable:
        return PlainProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, every_item=None)
    if in_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, **tqdm_kwargs)
    return PlainProgress(iterable, desc=desc, total=total, unit=unit, initial=initial,
                         every_item=every_item if lines else None)
