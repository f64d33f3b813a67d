"""The two errors a run reports in a sentence instead of a traceback, and the helpers that suggest
a valid name in such a sentence.

A `UserError` is anything the user can fix (config, paths, data, launch): lib/cli.py prints it as one
paragraph on stderr and exits with status 2. A `RunError` (the run cannot go on for a reason outside
the config) exits with status 1. did_you_mean() and choices_text() word the valid choices.
"""
import difflib


class UserError(Exception):
    """A mistake the user can fix; the message is one sentence that names the fix."""


def did_you_mean(word, choices):
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choices_text(choices, limit=12):
    """A short, sorted list of valid names for an error message."""
    names = sorted(str(c) for c in choices)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class RunError(Exception):
    """The run cannot go on for a reason outside the config (non-finite loss, full disk): exit 1,
    with this message and no traceback."""
