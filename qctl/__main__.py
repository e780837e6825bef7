"""``python -m qctl``: the same as the ``qctl`` command."""
from .cli import main

if __name__ == "__main__":
    main()
