"""``python -m retrieval.cli``: the same entry point as the ``clipdex`` script."""

from retrieval.cli.app import main

main()
