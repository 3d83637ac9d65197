"""Progress of long commands: a tqdm bar on a terminal, plain periodic lines anywhere else (CI logs, files).

    for name in progress(names, desc='check', unit='model', item=str):
        ...                                          # the bar shows the current name, elapsed time and time left

    with progress(total=size, desc='download', unit='B', unit_scale=True) as bar:
        bar.update(len(chunk))

On a terminal (the stream's ``isatty()``) the bar is tqdm's, redrawn in place. Elsewhere each update that comes
at least `interval` seconds (default `LINE_INTERVAL`, env ``ZOO_PROGRESS_INTERVAL``) after the previous line
prints one new line, ``desc: 40% 8/20 [elapsed 00:12, left 00:18, 1.50s/model, swin_tiny]``, plus a line at the
start and one at the end, with no carriage returns. ``TQDM_DISABLE=1`` switches every bar off.

This module imports only tqdm and the standard library, so train/, weights/ and bench/ can all use it.
"""
import contextlib
import logging
import os
import sys
import time
from typing import Callable, Generic, Iterable, Iterator, Optional, Sequence, TextIO, TypeVar

from tqdm import tqdm

__all__ = ['Progress', 'progress', 'logging_above_bars', 'LINE_INTERVAL']

T = TypeVar('T')

LINE_INTERVAL = 20.0  # seconds between two plain lines
_LINE_FORMAT = '{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [elapsed {elapsed}, left {remaining}, {rate_fmt}{postfix}]'
_LINE_FORMAT_OPEN = '{desc}: {n_fmt}{unit} [elapsed {elapsed}, {rate_fmt}{postfix}]'  # no total: no percentage, no ETA


def _interval() -> float:
    value = os.environ.get('ZOO_PROGRESS_INTERVAL')
    if not value:
        return LINE_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f'ZOO_PROGRESS_INTERVAL: expected seconds between progress lines, got {value!r}') from None
    if not seconds >= 0:
        raise ValueError(f'ZOO_PROGRESS_INTERVAL: expected seconds >= 0, got {value!r}')
    return seconds


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """The file tqdm writes to in line mode: each redraw ('\\r' + text + padding) becomes one plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.encoding = getattr(stream, 'encoding', None) or 'utf-8'
        self.last = 0.0  # time.monotonic() of the last line written
        self.bar: Optional[tqdm] = None
        self.n: Optional[float] = None  # the count the last line showed

    def write(self, text: str) -> None:
        line = text.replace('\r', '').strip()
        if line:
            self.stream.write(line + '\n')
            self.stream.flush()
            self.last = time.monotonic()
            self.n = None if self.bar is None else self.bar.n

    def flush(self) -> None:
        self.stream.flush()


class Progress(Generic[T]):
    """One progress bar (see the module docstring); build it with `progress`.

    Iterate over it to get the items of the wrapped iterable (counted when each one is done), or call `update`
    yourself; `set_item` names what is being worked on. A context manager; `close` prints the final state.
    """

    def __init__(self, iterable: Optional[Iterable[T]] = None, total: Optional[float] = None, desc: str = '',
                 unit: str = 'it', *, item: Optional[Callable[[T], str]] = None, unit_scale: bool = False,
                 leave: bool = True, file: Optional[TextIO] = None, tty: Optional[bool] = None,
                 interval: Optional[float] = None, initial: float = 0, disable: bool = False):
        stream = file if file is not None else sys.stderr
        self.tty = _is_tty(stream) if tty is None else bool(tty)
        self.interval = _interval() if interval is None else float(interval)
        if self.interval < 0:
            raise ValueError(f'interval: expected seconds >= 0, got {interval!r}')
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                pass
        self._iterable = iterable
        self._item = item
        kwargs = dict(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, smoothing=0.0)
        if disable:  # otherwise tqdm's own TQDM_DISABLE applies
            kwargs['disable'] = True
        self._lines: Optional[_Lines] = None
        if self.tty:
            self._bar = tqdm(file=stream, leave=leave, dynamic_ncols=True, **kwargs)
        else:
            # one line per redraw, at most one redraw per interval (miniters=1: tqdm checks the time at every
            # update, and its monitor thread never forces one), every bar on its own line (position 0)
            self._lines = _Lines(stream)
            self._bar = tqdm(file=self._lines, leave=True, position=0, mininterval=self.interval,
                             maxinterval=max(self.interval, 1.0), miniters=1, ascii=True,
                             bar_format=_LINE_FORMAT if total else _LINE_FORMAT_OPEN, **kwargs)
            self._lines.bar = self._bar
            self._lines.n = self._bar.n if self._lines.last else None  # the start line tqdm printed, if any

    @property
    def n(self) -> float:
        """How much is done (items, or bytes for a download)."""
        return self._bar.n

    def __iter__(self) -> Iterator[T]:
        if self._iterable is None:
            raise TypeError('progress(): iterate over a bar built with an iterable, or call update()')
        done = 0
        try:
            for obj in self._iterable:
                if self._item is not None:
                    self._bar.set_postfix_str(self._item(obj), refresh=False)
                if done:  # the previous item is counted once the next one is named: a line shows what runs now
                    self.update(done)
                elif self._item is not None:
                    self._redraw()
                done = 1
                yield obj
            if done:
                self.update(done)
        finally:
            self.close()

    def update(self, n: float = 1, item: Optional[str] = None) -> None:
        """Count `n` more units as done; `item` names what runs now (shown with this update's redraw)."""
        if item is not None:
            self._bar.set_postfix_str(item, refresh=False)
        self._bar.update(n)

    def set_item(self, text: str) -> None:
        """Name the current item (shown after the rate). A terminal bar redraws at once; in line mode a line is
        printed when the last one is older than the interval."""
        self._bar.set_postfix_str(text, refresh=False)
        self._redraw()

    def _redraw(self) -> None:
        if self._bar.disable:
            return
        if self._lines is None or time.monotonic() - self._lines.last >= self.interval:
            self._bar.refresh()

    def close(self) -> None:
        """Print the final state (a last line in line mode, unless the previous line showed it) and release the
        bar; idempotent."""
        if self._lines is not None and self._lines.n == self._bar.n:
            self._bar.leave = False  # tqdm then clears instead of redrawing, which writes nothing here
        self._bar.close()

    def __enter__(self) -> 'Progress[T]':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable[T]] = None, total: Optional[float] = None, desc: str = '',
             unit: str = 'it', *, item: Optional[Callable[[T], str]] = None, unit_scale: bool = False,
             leave: bool = True, file: Optional[TextIO] = None, tty: Optional[bool] = None,
             interval: Optional[float] = None, initial: float = 0, disable: bool = False) -> Progress[T]:
    """A progress bar over `iterable` (or over `total` units counted with `update`).

    Args:
        iterable: the items to go through; `total` defaults to its length.
        total: how many units in all (None: unknown; no percentage or time left then).
        desc: what is going on ('check', 'train', 'download swin_tiny.pth').
        unit: the unit counted ('model', 'iter', 'B').
        item: a function naming each item of `iterable` as it starts (e.g. `str`); or call `set_item`.
        unit_scale: show 1.2M instead of 1200000 (and kB/MB for unit 'B').
        leave: keep a terminal bar on screen when closed (line mode always prints a final line).
        file: the stream (default: sys.stderr at the time of the call).
        tty: force the terminal bar (True) or plain lines (False); default: ``file.isatty()``.
        interval: seconds between plain lines (default `LINE_INTERVAL`, or ``ZOO_PROGRESS_INTERVAL``).
        initial: units already done (a resumed run); the rate and the time left count only the new ones.
        disable: show nothing.
    """
    return Progress(iterable, total, desc, unit, item=item, unit_scale=unit_scale, leave=leave, file=file, tty=tty,
                    interval=interval, initial=initial, disable=disable)


def logging_above_bars(loggers: Sequence[logging.Logger]) -> contextlib.AbstractContextManager:
    """A context in which the console handlers of `loggers` print above the bars when stderr is a terminal
    (tqdm's logging redirect) instead of into the bar's line; elsewhere, and for file handlers, nothing changes."""
    if not _is_tty(sys.stderr):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm(loggers=list(loggers))
