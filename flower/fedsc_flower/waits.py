"""Flower 1.42's waits, shortened in this app's processes.

A message's objects (its weights) can reach a process after the message itself; Flower then asks again
after 1 s, 2 s, 4 s ... up to 10 s (the initial_backoff and backoff_cap arguments of its pull_objects).
A SuperNode that finds no message waits 3 s before it asks the SuperLink again, and 0.5 s between
looks for its ClientApp's reply. At a sub-second round these waits are most of a round. shorten()
passes smaller values to those same functions; Backoff replaces the fixed waits: a first wait of
FIRST s after any work, each next one FIRST s longer (0.02, 0.04, 0.06, ...: an answer that comes t s
later is seen within about sqrt(2 FIRST t) s of it), none longer than POLL s, so an idle process asks
1 / POLL times a second. The ServerApp, one process, waits at most SERVER_POLL s for the sites' replies."""
import functools
import time

FIRST, POLL, SERVER_POLL = 0.02, 0.2, 0.05  # SERVER_POLL: the ServerApp's longest wait for the sites' replies


def shorten(*modules):
    """In each module that calls Flower's pull_objects / pull_and_inflate_object_from_tree, call them with
    the short backoff."""
    for module in modules:
        for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
            f = getattr(module, name, None)
            if f is not None and not isinstance(f, functools.partial):
                setattr(module, name, functools.partial(f, initial_backoff=FIRST, backoff_cap=POLL))


class Backoff:
    """wait(): FIRST s after a reset (work was done), then each wait FIRST s longer, up to cap s."""

    def __init__(self, cap=POLL):
        self.cap = cap
        self.reset()

    def reset(self):
        self.last = 0.0

    def wait(self):
        self.last = min(self.last + FIRST, self.cap)
        time.sleep(self.last)


class ShortSleep:
    """A stand-in for the SuperNode loop's `time`: the same clock; its waits for a message become a Backoff,
    its looks for a local reply (0.5 s) every FIRST s."""

    def __init__(self):
        self.backoff = Backoff()

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds):
        if seconds >= 1:  # the 3 s wait for a message from the SuperLink
            self.backoff.wait()
        else:  # a look into its own state for a ClientApp's reply: a message is being handled
            self.backoff.reset()
            time.sleep(min(seconds, FIRST))
