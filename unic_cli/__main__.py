"""`python -m unic_cli` -> cli.unic()."""

from unic_cli.cli import unic

if __name__ == "__main__":
    unic(prog_name="unic")
