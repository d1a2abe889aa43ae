"""The one exception biaskit raises for input a user can fix."""


class InputError(ValueError):
    """Bad input: the message says what is wrong and how to fix it.

    The command line turns it into one line on stderr and exit status 2.
    """


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (empty when it has none), for one-line errors."""
    return (str(err).strip().splitlines() or [""])[0]
