import sys

from hfl_jax.cli import main

sys.exit(main())
