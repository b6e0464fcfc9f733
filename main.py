"""`python main.py COMMAND ...` in a repository checkout; installed, the same command line is `minimind-jax`."""
import sys

from minimind_jax.cli import console_main, main  # main(argv) runs a command in this process (tests use it)

if __name__ == "__main__":
    sys.exit(console_main())
