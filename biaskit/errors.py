"""The one exception biaskit raises for input a user can fix."""


class InputError(ValueError):
    """Bad input: the message says what is wrong and how to fix it.

    The command line turns it into one line on stderr and exit status 2.
    """
