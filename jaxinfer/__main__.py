"""`python -m jaxinfer` runs the command line."""

from jaxinfer.cli import run

run()
