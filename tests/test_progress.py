"""Progress with a time left: plain lines in logs (at most one per interval, and one at the end)."""

from raml.cli.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_say_how_far_and_how_long_is_left():
    clock, lines = Clock(), []
    steps = Progress(terminal=False, say=lines.append, every=30, clock=clock)
    steps.begin("sweep training", 10, "epochs")
    for _ in range(4):  # 4 epochs of 10 s: one line, at 30 s (the interval), none at 40 s
        clock.now += 10
        steps.advance()
    assert lines == ["sweep training: 3/10 epochs (30 %), 0:30 elapsed, about 1:10 left"]
    clock.now += 80
    steps.advance(6)
    steps.end()
    assert lines[-1] == "sweep training: 10/10 epochs (100 %), 2:00 elapsed"
    steps.echo("a line of the command's own")
    assert lines[-1] == "a line of the command's own"


def test_a_phase_with_nothing_to_do_says_nothing():
    lines = []
    with Progress(terminal=False, say=lines.append) as steps:
        steps.begin("sweep training", 0, "epochs")
        steps.advance()
    assert lines == []


def test_durations():
    assert [duration(s) for s in (0, 42, 61, 3725)] == ["0:00", "0:42", "1:01", "1:02:05"]
