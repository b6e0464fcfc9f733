"""The one exception type for bad input: its message is a single line naming the file, line or key."""


class UserError(Exception):
    """Bad input from the user (a file, flag or record). `main.py` prints it as one line and exits 1."""


def first_line(error: BaseException) -> str:
    """An error's message cut to one line of at most 200 characters (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
