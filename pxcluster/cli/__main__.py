"""`python -m pxcluster.cli`: the command line."""

from pxcluster.cli import main

main()
