import sys

from .cli import main

# Guarded: multiprocessing's spawn may import the main module of a `python -m hipipc` run.
if __name__ == "__main__":
    sys.exit(main())
