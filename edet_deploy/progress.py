"""One live progress bar per long job: on stderr, only on a terminal (the CLI decides), covering every phase of
the job, each phase naming itself on the bar. Library functions take an optional `bar` and tick it per item;
without one they stay silent."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def job_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar of `total` steps (a disabled one, whose calls do nothing, when not `enabled`)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def phase(bar, name: str) -> None:
    """Name the phase now running on `bar` (None: no bar)."""
    if bar is not None:
        bar.set_postfix_str(name, refresh=True)


def ticking(items: Iterable[T], bar, name: Optional[str] = None) -> Iterator[T]:
    """`items`, one step of `bar` after each (and `name` as the phase, if given)."""
    if name is not None:
        phase(bar, name)
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)


def tick(bar, n: int = 1) -> None:
    """Advance `bar` by `n` steps (None: no bar): work done at once, or skipped (a cache hit)."""
    if bar is not None and n > 0:
        bar.update(n)
