"""Attacks from outside: the REST port and the CLI fed hostile or bad input."""
