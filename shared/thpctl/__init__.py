"""thpctl: the command-line client of the thpsplit daemons (one module per command group).

:func:`shared.thpctl.cli.amain` runs a command line in an existing trio run (tests use it);
``thpctl`` / ``python -m shared.thpctl`` is :func:`shared.thpctl.__main__.main`.
"""
