"""`python -m tagcaption`: the same as the `caption` command."""
from tagcaption.cli import cli

cli()
