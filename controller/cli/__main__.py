"""``python -m controller.cli``: the ``rtmanager`` command."""

from controller.cli import main

main()
