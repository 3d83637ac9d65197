"""zoo.progress: a tqdm bar with the current item, elapsed time and time left on a terminal; plain periodic lines
(no carriage returns) anywhere else."""
import io
import logging
import re
import sys
import time

import pytest

from zoo.progress import logging_above_bars, progress

LINE = re.compile(r'^check: +(\d+)% (\d+)/3 \[elapsed (\d\d:\d\d), left (\?|\d\d:\d\d), .*\]$')


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    names = ['swin_tiny', 'nat_tiny', 'maxvit_tiny']
    seen = list(progress(names, desc='check', unit='model', item=str, file=stream, interval=0))
    assert seen == names
    text = stream.getvalue()
    assert '\r' not in text and '\x1b' not in text
    lines = text.splitlines()
    assert all(LINE.match(ln) for ln in lines), lines
    # a start line, then (interval 0) a line whenever an item starts, naming it, and the final count
    assert lines[0] == 'check:   0% 0/3 [elapsed 00:00, left ?, ?model/s]'
    assert [LINE.match(ln).group(2) for ln in lines] == ['0', '0', '1', '2', '3']
    assert [ln.rsplit(', ', 1)[-1] for ln in lines[1:]] == ['swin_tiny]', 'nat_tiny]', 'maxvit_tiny]', 'maxvit_tiny]']


def test_plain_lines_are_periodic():
    """Updates closer together than the interval print nothing between the first and the last line."""
    stream = io.StringIO()
    with progress(total=200, desc='train', unit='iter', file=stream, interval=0.2) as bar:
        for i in range(200):
            time.sleep(0.002)
            bar.update(1, item=f'iter {i}')
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith('train:   0% 0/200 ') and lines[-1].startswith('train: 100% 200/200 [elapsed 00:0')
    assert 2 <= len(lines) <= 2 + 0.4 / 0.2 + 2, lines  # ~0.4 s of updates: a line per 0.2 s at most
    assert lines[-1].endswith(', iter 199]')


def test_terminal_bar_shows_item_elapsed_and_time_left():
    stream = FakeTerminal()
    for _ in progress(['swin_tiny', 'nat_tiny'], desc='check', unit='model', item=str, file=stream):
        time.sleep(0.15)
    text = stream.getvalue()
    frames = [f for f in text.split('\r') if f.strip()]
    assert len(frames) >= 3 and text.endswith('\n')  # redrawn in place, left on screen when done
    # tqdm's bar: desc, percentage, bar, count, [elapsed<left, rate, current item]
    assert re.search(r'check:  50%\|.*\| 1/2 \[00:00<00:00, +[0-9.]+(model/s|s/model), nat_tiny\]', text), frames
    assert re.search(r'check: 100%\|#+\| 2/2 \[00:00<00:00, .*nat_tiny\]', frames[-1]), frames
    # forcing either mode overrides the stream
    forced = io.StringIO()
    with progress(total=2, desc='x', file=forced, tty=True) as bar:
        bar.update(2)
    assert forced.getvalue().startswith('\rx:   0%|')
    plain = FakeTerminal()
    with progress(total=2, desc='x', file=plain, tty=False) as bar:
        bar.update(2)
    assert '\r' not in plain.getvalue()


def test_default_stream_unknown_total_and_switches(capsys, monkeypatch):
    """sys.stderr at call time (here pytest's capture, no terminal); a total that is unknown shows the count and
    rate only; disable shows nothing; ZOO_PROGRESS_INTERVAL sets the interval and is checked."""
    with progress(desc='download x.pth', unit='B', unit_scale=True, interval=0) as bar:
        bar.update(1500)
        bar.update(2_000_000)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith('download x.pth: 0.00B [elapsed 00:00, ')
    assert err[-1].startswith('download x.pth: 2.00MB [elapsed 00:0') and 'B/s' in err[-1]
    for _ in progress(range(3), desc='quiet', disable=True):
        pass
    assert capsys.readouterr().err == ''
    monkeypatch.setenv('ZOO_PROGRESS_INTERVAL', '7.5')
    assert progress(range(1), disable=True).interval == 7.5
    monkeypatch.setenv('ZOO_PROGRESS_INTERVAL', 'often')
    with pytest.raises(ValueError, match="ZOO_PROGRESS_INTERVAL: expected seconds between progress lines, got 'often'"):
        progress(range(1))
    with pytest.raises(ValueError, match='interval: expected seconds >= 0, got -1'):
        progress(range(1), interval=-1)


def test_logging_above_bars_only_on_a_terminal(monkeypatch):
    logger = logging.getLogger('zoo-test-progress')
    console = logging.StreamHandler(sys.stderr)
    logger.handlers = [console]
    with logging_above_bars([logger]):
        assert logger.handlers == [console]  # pytest's stderr is no terminal: nothing changes
    monkeypatch.setattr(sys, 'stderr', FakeTerminal())
    console.stream = sys.stderr
    with logging_above_bars([logger]):
        assert console not in logger.handlers and type(logger.handlers[0]).__name__ == '_TqdmLoggingHandler'
    assert logger.handlers == [console]
