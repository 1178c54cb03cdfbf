"""``python -m stair_search.cli``: the same as the ``stair-search`` command."""

from stair_search.cli.commands import main

main()
