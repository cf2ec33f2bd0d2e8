"""`python -m fmoe ...`: the same as the `fmoe` command."""

from .cli import main

main()
