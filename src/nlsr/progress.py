"""Progress of long steps, one style everywhere: a rich bar on stderr in a terminal; elsewhere (a log
file, a pipe, CI) a plain line at the start, about every 10% of the work (at most every 5 s), and at
the end, so a long step never sits silent for minutes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence


def track(items: Sequence, description: str, enabled: bool = True, unit: str = "batches") -> Iterable:
    """``items``, reporting progress as they are consumed."""
    if not enabled:
        return items
    counter = Counter(len(items), description, unit=unit)

    def walk() -> Iterator:
        with counter:
            for item in items:
                yield item
                counter.advance(1)
    return walk()


class Counter:
    """A progress counter for work that advances by more than one item at a time (a generation batch)::

        with Counter(len(prompts), "generating", done=len(cached), unit="prompts") as bar:
            ...
            bar.advance(len(batch))
    """

    def __init__(self, total: int, description: str, done: int = 0, unit: str = "items") -> None:
        from rich.console import Console

        self.total, self.description, self.done, self.unit = total, description, done, unit
        self.console = Console(stderr=True)
        self._bar = None

    def __enter__(self) -> Counter:
        self.start = self.last = time.monotonic()
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(self.description), BarColumn(), TaskProgressColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done)
        else:
            resumed = f" ({self.done} done before)" if self.done else ""
            self._say(f"{self.description}: {self.total} {self.unit}{resumed}")
        return self

    def advance(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now, step = time.monotonic(), max(1, self.total // 10)
        if self.done < self.total and self.done // step > before // step and now - self.last >= 5:
            self._say(f"{self.description}: {self.done}/{self.total} {self.unit}, {now - self.start:.0f} s")
            self.last = now

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc[0] is None:
            self._say(f"{self.description}: {self.done}/{self.total} {self.unit} in "
                      f"{time.monotonic() - self.start:.1f} s")

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False)
