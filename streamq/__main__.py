"""``python -m streamq``: the same as the ``streamq`` command."""

from ._cli import console_main

if __name__ == "__main__":
    console_main()
