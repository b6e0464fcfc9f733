import sys

from minimind_jax.cli.convert import main

sys.exit(main())
