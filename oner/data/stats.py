"""Counting damaged samples: skipped, counted by kind, never fatal.

A ``DataStats`` object is shared by the data set wrapper (which finds most damage while decoding)
and the collator (which drops the ``None`` items left behind). Its counters live in a small torch
tensor in shared memory, one row per DataLoader worker, so that counts made inside worker processes
are visible to the training loop in the main process (a plain Python dict would be copied into each
worker and its counts lost) and no two processes ever write the same cell.
"""

from __future__ import annotations

import torch

#: The kinds of damage a sample can have, in report order.
DAMAGE_KINDS: tuple[str, ...] = (
    "missing_file",  # the path does not exist
    "empty_file",  # zero bytes
    "not_an_image",  # PIL cannot identify the format (e.g. a text file named .png)
    "truncated",  # the header is fine but the pixel data ends early
    "decompression_bomb",  # more pixels than PIL.Image.MAX_IMAGE_PIXELS allows
    "unreadable",  # any other decoding or reading error
    "empty_caption",  # no caption, or only whitespace
)

#: Other counters: good samples, and ``None`` items the collator dropped.
_OTHER = ("ok", "dropped_in_collate")
_COLUMNS = DAMAGE_KINDS + _OTHER
_MAX_WORKERS = 64  # one row per DataLoader worker, plus row 0 for the main process


def _worker_row() -> int:
    """Row of the counter table owned by this process (0 = main, 1 + worker id otherwise)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0
    return 1 + (info.id % _MAX_WORKERS)


class DataStats:
    """Counts of good and damaged samples, safe to share with DataLoader worker processes.

    ``record(kind)`` adds one to a counter; ``as_dict()`` sums all workers; ``summary()`` is the
    one-line report the training loop prints at the end.
    """

    def __init__(self) -> None:
        self._counts = torch.zeros(_MAX_WORKERS + 1, len(_COLUMNS), dtype=torch.int64)
        # Shared memory: forked or spawned DataLoader workers write into the same storage.
        self._counts.share_memory_()

    def record(self, kind: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``kind`` (one of ``DAMAGE_KINDS``, ``"ok"``, ``"dropped_in_collate"``)."""
        try:
            column = _COLUMNS.index(kind)
        except ValueError:
            raise ValueError(f"unknown counter {kind!r}; expected one of {list(_COLUMNS)}") from None
        self._counts[_worker_row(), column] += n

    def as_dict(self) -> dict[str, int]:
        """All counters summed over workers, plus ``skipped`` (all damage kinds together)."""
        return self.counts_dict(self._counts.sum(dim=0))

    @staticmethod
    def counts_dict(values: torch.Tensor) -> dict[str, int]:
        """``as_dict()`` of one row of counters (e.g. ``own_counts()[1:]``, or rows summed)."""
        out = {name: int(v) for name, v in zip(_COLUMNS, values.tolist())}
        out["skipped"] = sum(out[k] for k in DAMAGE_KINDS)
        return out

    def own_counts(self) -> torch.Tensor:
        """``[row, *counters]``: what the calling process (a DataLoader worker, or the main process)
        has recorded so far, and the row it records into."""
        row = _worker_row()
        return torch.cat([torch.tensor([row]), self._counts[row]])

    def rows(self) -> torch.Tensor:
        """A copy of every process's counters, one row each (row 0: the main process)."""
        return self._counts.clone()

    def summary(self, counts: dict[str, int] | None = None) -> str:
        """A one-line human report, e.g. ``data: 998 ok, 2 skipped (truncated: 1, empty_caption: 1)``,
        of these counters or of ``counts`` (an ``as_dict()``, e.g. summed over processes)."""
        d = self.as_dict() if counts is None else counts
        parts = [f"{k}: {d[k]}" for k in DAMAGE_KINDS if d[k]]
        text = f"data: {d['ok']} ok, {d['skipped']} skipped"
        if parts:
            text += " (" + ", ".join(parts) + ")"
        if d["dropped_in_collate"]:
            text += f", {d['dropped_in_collate']} dropped in collate"
        return text

    def __repr__(self) -> str:
        return f"DataStats({self.summary()})"
