"""The library's version: ``flame_asgi.__version__``, and what spans report as theirs."""

VERSION = "0.1.0"
