"""Flower 1.42's waits, shortened in this app's processes.

A message's objects (its weights) can reach a process after the message itself; Flower then asks again
after 1 s, 2 s, 4 s ... up to 10 s (the initial_backoff and backoff_cap arguments of its pull_objects).
A SuperNode that finds no message waits 3 s before it asks the SuperLink again, and 0.5 s between
looks for its ClientApp's reply. At a sub-second round these waits are most of a round. shorten()
passes smaller values to those same functions: a first retry after 0.02 s, none later than POLL s."""
import functools
import time

POLL = 0.1  # the longest wait; an idle SuperNode asks its SuperLink 10 times a second


def shorten(*modules):
    """In each module that calls Flower's pull_objects / pull_and_inflate_object_from_tree, call them with
    the short backoff."""
    for module in modules:
        for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
            f = getattr(module, name, None)
            if f is not None and not isinstance(f, functools.partial):
                setattr(module, name, functools.partial(f, initial_backoff=0.02, backoff_cap=POLL))


class ShortSleep:
    """A stand-in for a module's `time`: the same clock, sleeps of at most POLL s."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        time.sleep(min(seconds, POLL))
