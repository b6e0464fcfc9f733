"""The one exception type for bad input: its message is a single line naming the file, line or key."""


class UserError(Exception):
    """Bad input from the user (a file, flag or record). `main.py` prints it as one line and exits 1."""
