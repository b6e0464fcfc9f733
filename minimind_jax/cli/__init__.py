"""The command line: `main.py COMMAND` / `minimind-jax COMMAND`, one module per command."""
