"""CPU start-up (issue 25): `emerdiff --help`, every sub-command's --help and the refusal of a bad argument
load no torch, diffusers, transformers, scipy or sklearn; importing the package loads none of them either.
Each case runs in a fresh interpreter (a module imported by another test would hide an import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "scipy", "sklearn")


def _commands() -> list[str]:
    """Every sub-command the parser has (a new one is covered without editing this test)."""
    from emerdiff.cli.app import build_parser

    return sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


COMMANDS = _commands()

PROBE = """
import contextlib, io, json, sys
argv = json.loads(sys.argv[1])
code = None
if argv is None:
    import emerdiff  # noqa: F401
    import emerdiff.cli.evaluate  # noqa: F401
else:
    from emerdiff.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps(dict(code=code, heavy=heavy)))
"""


def probe(argv: list[str] | None, cwd=None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True,
                         text=True, check=True, cwd=cwd)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_no_heavy_module():
    assert probe(None)["heavy"] == []


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in COMMANDS]], ids=lambda a: " ".join(a))
def test_help_loads_no_heavy_module(argv):
    result = probe(argv)
    assert result["code"] == 0
    assert result["heavy"] == [], f"emerdiff {' '.join(argv)} imported {result['heavy']}"


REFUSALS = [
    [],  # no command
    ["segment"],  # no image
    ["segment", "a.png", "--dtype", "float8"],
    ["segment", "a.png", "--num-clusters", "1"],  # a setting refused by the config's checks
    ["segment", "a.png", "--set", "num_clusters=many"],
    ["refine", "a.png"],  # no --masks
    ["layers"],
    ["evaluate", "--out", "o"],  # no --data
    ["evaluate", "--data", "d", "--out", "o", "--protocol", "nope"],
    ["compare", "only_one"],
    ["figures", "--only", "99", "--notebooks", "."],
    ["bogus"],
]


@pytest.mark.parametrize("argv", REFUSALS, ids=lambda a: " ".join(a) or "(none)")
def test_refusals_load_no_heavy_module(argv, tmp_path):
    result = probe(argv, cwd=tmp_path)
    assert result["code"] not in (0, None), f"emerdiff {' '.join(argv)} was not refused"
    assert result["heavy"] == [], f"refusing emerdiff {' '.join(argv)} imported {result['heavy']}"


def test_parser_protocol_names_are_the_protocols():
    """cli.evaluate keeps the protocol names for its choices without importing the protocols module."""
    from emerdiff.cli.evaluate import KNOWN_PROTOCOL_NAMES, PROTOCOL_NAMES
    from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS, PROTOCOLS

    assert PROTOCOL_NAMES == PROTOCOLS
    assert KNOWN_PROTOCOL_NAMES == KNOWN_PROTOCOLS
