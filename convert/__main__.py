import sys

from minimind_jax.convert_cli import main

sys.exit(main())
