"""`python -m llm_jax.hf export ...` (see `llm_jax.hf.export`)."""

import sys

from llm_jax import cli
from llm_jax.hf.export import main

if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:])))
