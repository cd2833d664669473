"""The command line: argument parsing only (Namespace -> config -> the runners below).

``emerdiff`` (the console script) is :func:`emerdiff.cli.app.main`; ``evaluate`` and ``compare`` live in
:mod:`emerdiff.cli.evaluate`, the flags every command shares in :mod:`emerdiff.cli.options`.
"""

from emerdiff.cli.app import main

__all__ = ["main"]
