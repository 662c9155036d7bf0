"""`python -m knowpatch.cli …`: the same as the `knowpatch` command."""

from . import main

if __name__ == "__main__":
    main()
