"""`python -m hf_neuralcache`: the same as the `hf-neuralcache` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
