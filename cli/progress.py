"""Progress with a time left, for the long passes of the commands (training epochs, sweep and ablate
passes, scoring many runs): a tqdm bar on a terminal (``options.show_progress``), and in logs and
pipes a plain line now and then, ``sweep training: 12/45 epochs (27 %), 0:42 elapsed, about 1:53
left``, so that a log read later still says how far a job got and how long it had to go.

The code that does the work knows nothing of bars: it takes an object with the three methods of
``Progress`` (``begin`` a phase of ``total`` units, ``advance`` by some, ``end`` it), or None.
"""

from __future__ import annotations

import time

import click

from raml.cli.options import show_progress

PLAIN_EVERY_SECONDS = 30.0  # at most one plain line this often (and one when a phase ends)


def duration(seconds: float) -> str:
    """``42`` → ``0:42``, ``3725`` → ``1:02:05``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Phases of counted work, one at a time, shown with the time left.

    ``terminal``: draw tqdm bars (default: ``show_progress()``); otherwise ``say`` (default:
    ``click.echo``) gets a plain line at most every ``every`` seconds and when a phase ends.
    ``echo`` prints a line of the command's own output without breaking a bar.
    """

    def __init__(self, terminal: bool | None = None, say=None, every: float = PLAIN_EVERY_SECONDS, clock=None):
        self.terminal = show_progress() if terminal is None else terminal
        self.say = say or click.echo
        self.every = every
        self.clock = clock or time.monotonic
        self.bar = None
        self.desc, self.unit, self.total, self.done = "", "", 0, 0
        self.started = self.last_line = 0.0

    def begin(self, desc: str, total: int, unit: str) -> None:
        """Start a phase of ``total`` ``unit`` (ending the one before)."""
        self.end()
        self.desc, self.unit, self.total, self.done = desc, unit, int(total), 0
        self.started = self.last_line = self.clock()
        if self.terminal and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def advance(self, count: int = 1) -> None:
        """``count`` more units of the phase done."""
        if not self.total:
            return
        self.done = min(self.done + count, self.total)
        if self.bar is not None:
            self.bar.update(count)
        elif self.clock() - self.last_line >= self.every and self.done < self.total:
            self.last_line = self.clock()
            self.say(self.line())

    def end(self) -> None:
        """End the phase: close its bar, or say its last plain line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.total and self.done:
            self.say(self.line())
        self.total = 0

    def echo(self, line: str) -> None:
        """Print ``line`` above the bar (or plainly)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.say(line)

    def line(self) -> str:
        """``sweep training: 12/45 epochs (27 %), 0:42 elapsed, about 1:53 left``."""
        elapsed = self.clock() - self.started
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %), "
        text += f"{duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", about {duration(elapsed / self.done * (self.total - self.done))} left"
        return text

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()
