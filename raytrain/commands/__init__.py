"""One module per `raytrain` command; see `raytrain/cli.py` for the contract."""
