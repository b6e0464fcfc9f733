"""`python main.py COMMAND ...` in a repository checkout; installed, the same command line is `minimind-jax`."""

import sys

from minimind_jax.cli.main import console_main, main  # noqa: F401 (main(argv): a command in this process, for tests)

if __name__ == "__main__":
    sys.exit(console_main())
