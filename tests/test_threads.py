"""The torch thread policy (issue 29): one function, shown in the settings line, on every computing command."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from emerdiff import threads as policy


def _machine(monkeypatch, cores: int, load: float | None) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if load is None:
        def no_load():
            raise OSError("no load average here")
        monkeypatch.setattr(os, "getloadavg", no_load)
    else:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.delenv(policy.THREADS_ENV, raising=False)


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (1, 0.0, 1), (2, 0.0, 1), (2, 3.5, 1), (3, 0.1, 1),   # small machine: one thread, whatever the load
    (4, 0.0, 4), (4, 1.3, 2), (8, 2.0, 6), (16, 1.3, 14),  # the cores the load leaves free
    (8, 7.6, 1), (8, 30.0, 1),                             # a machine busier than its cores: still one
    (8, None, 8),                                          # no load average (Windows): every core
])
def test_auto_policy_follows_cores_and_load(monkeypatch, cores, load, expected):
    _machine(monkeypatch, cores, load)
    choice = policy.choose_threads()
    assert choice.threads == expected and choice.source == "auto"
    assert choice.cores == cores and choice.load == load
    text = choice.describe()
    assert text.startswith(f"threads {expected} (auto: {cores} cores, ")
    assert ("load unknown" in text) if load is None else (f"load {load:.1f}" in text)


def test_affinity_limits_the_cores(monkeypatch):
    """A container pinned to 2 of the host's 64 cores is a 2-core machine."""
    _machine(monkeypatch, 64, 0.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert policy.cpu_cores() == 2 and policy.choose_threads().threads == 1


def test_flag_then_environment_then_auto(monkeypatch):
    _machine(monkeypatch, 16, 0.0)
    assert policy.choose_threads(3) == policy.ThreadChoice(3, "given")
    monkeypatch.setenv(policy.THREADS_ENV, "5")
    assert policy.choose_threads().threads == 5 and policy.THREADS_ENV in policy.choose_threads().describe()
    assert policy.choose_threads(2).threads == 2  # the flag wins over the environment
    assert policy.choose_threads(0).threads == 16  # 0: torch's own default, one per core
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv(policy.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=policy.THREADS_ENV):
            policy.choose_threads()
    with pytest.raises(ValueError, match="--threads"):
        policy.choose_threads(-2)


def test_apply_sets_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        policy.apply_threads(policy.ThreadChoice(1, "given"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_settings_line_shows_the_thread_choice(monkeypatch):
    from emerdiff.cli.app import build_parser
    from emerdiff.cli.options import config_from_args, settings_line

    _machine(monkeypatch, 2, 1.3)
    args = build_parser().parse_args(["segment", "x.png"])
    line = settings_line(args, config_from_args(args), policy.choose_threads(args.threads))
    assert line.endswith("; threads 1 (auto: 2 cores, load 1.3)"), line
    args = build_parser().parse_args(["segment", "x.png", "--threads", "3"])
    assert settings_line(args, config_from_args(args), policy.choose_threads(args.threads)).endswith(
        "; threads 3 (given)")


def test_segment_prints_the_thread_choice(monkeypatch, capsys, tmp_path):
    """The settings line `segment` prints names the threads; a refused setting stops it before any model load."""
    from emerdiff.cli.app import main

    _machine(monkeypatch, 2, 0.4)
    # an output folder that is a file: refused after the settings line, before the model loads
    blocker = tmp_path / "out"
    blocker.write_text("x")
    code = main(["segment", str(tmp_path / "missing.png"), "--out", str(blocker)])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"settings for model 'reference' .*; threads 1 \(auto: 2 cores, load 0\.4\)", err), err
    assert main(["segment", "x.png", "--threads", "-1"]) == 2
    assert "--threads must be a whole number" in capsys.readouterr().err


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# The commands that run a model (torch computes); compare reads cached records with numpy, layers lists modules.
COMPUTING = ("segment", "refine", "evaluate", "figures", "table2")


def test_every_computing_command_takes_threads():
    from emerdiff.cli.app import build_parser

    commands = _subcommands(build_parser())
    assert set(COMPUTING) <= set(commands)
    for name in COMPUTING:
        assert "--threads" in commands[name].format_help(), f"emerdiff {name} has no --threads"
    # those without: they run no model
    for name in set(commands) - set(COMPUTING):
        assert name in ("layers", "compare"), f"new command {name}: does it compute? then give it --threads"


def test_figures_passes_threads_to_the_notebooks_default_policy():
    """The notebooks' torch_threads default is None = the same policy (lab.setup), and the parameter cells say so."""
    import inspect
    from pathlib import Path

    from emerdiff.notebook import lab

    assert inspect.signature(lab.setup).parameters["torch_threads"].default is None
    root = Path(__file__).resolve().parents[1] / "notebooks"
    for source in sorted(root.glob("[0-9][0-9]_*.py")):
        assert re.search(r"^torch_threads = None\b", source.read_text(), re.M), source.name
