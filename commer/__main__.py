"""``python -m commer``: the ``commer`` command, also as ``accelerate launch -m commer train CONFIG``."""

from commer.cli import main

if __name__ == "__main__":
    main()
