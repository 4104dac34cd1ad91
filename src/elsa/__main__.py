"""``python -m elsa ...`` (what ``torchrun -m elsa`` runs): the same as the ``elsa`` command."""
from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
