"""The one exception type for mistakes a user can make and fix."""


class FedvisionError(Exception):
    """A user-fixable problem: bad path, bad config value, unreadable input, wrong checkpoint.

    The message says what was wrong and how to fix it; the CLI prints it on one line without a
    traceback and exits with status 2.
    """
