"""The one exception type that the CLI turns into a clean message and a non-zero exit."""


class NlsrError(Exception):
    """A problem with the user's input or environment.

    The message names what is wrong and how to fix it; the CLI prints it without a traceback
    and exits with status 2. Internal invariants use ``assert`` instead.
    """
