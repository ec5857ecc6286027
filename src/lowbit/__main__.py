"""`python -m lowbit ...` (and `torchrun -m lowbit ...`): the same CLI as the `lowbit` command."""

from .cli import app

app(prog_name="lowbit")
