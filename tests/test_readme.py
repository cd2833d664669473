"""The README's numbers, defaults, commands and links are read from the code or a results file (issue 29).

Nothing here is a copy of a README number: each is parsed out of README.md and compared with
emerdiff.config.PRESETS, emerdiff.assets.scenes.CLASSES, the parser of `emerdiff`, the Makefile,
the results file the headline table names, and the timing files the jobs table names.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADLINE = re.compile(r"<!-- headline:start -->(.*?)<!-- headline:end -->", re.S)
NUMBER = r"[+-]?\d+(?:\.\d+)?"
CELL = re.compile(rf"^({NUMBER}) \[({NUMBER}), ({NUMBER})\]$")


def readme() -> str:
    return README.read_text()


def section(text: str, title: str) -> str:
    """The text of the ``## title...`` section (up to the next ``## ``)."""
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as a list of {header: cell} rows."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| ]+\|$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def table_with(text: str, column: str) -> list[dict[str, str]]:
    found = [t for t in tables(text) if t and column in t[0]]
    assert found, f"no table with a '{column}' column"
    return found[0]


# --------------------------------------------------------------------------- the front page's shape
def test_readme_is_a_front_page():
    text = readme()
    assert len(text.splitlines()) <= 200, "the README is a front page: move details to docs/GUIDE.md"
    for title in ("Two commands", "A first run", "Main jobs", "Headline results", "Everything else"):
        section(text, title)
    # one figure, tracked in git
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) == 1, figures
    tracked = subprocess.run(["git", "ls-files", figures[0]], cwd=ROOT, capture_output=True, text=True).stdout
    assert (ROOT / figures[0]).is_file() and tracked.strip() == figures[0]


STALE = ("v0 shipped", "session 6", "session 7", "Session 6", "Session 7", "the issue's bar", "t_m = 281 for reference")


@pytest.mark.parametrize("name", ["README.md", "docs/GUIDE.md", "docs/HISTORY.md"])
def test_no_stale_statements(name):
    """Statements found false or meaningless to a reader (issue 29) stay out of the front page and its guides."""
    text = (ROOT / name).read_text()
    assert not [s for s in STALE if s in text]


def test_stale_check_is_not_vacuous():
    assert [s for s in STALE if s in "reference (v0 shipped; 128 px)"]


# --------------------------------------------------------------------------- defaults from the code
PRESET_COLUMNS = {"image size": "resolution", "K (segments)": "num_clusters", "steps": "num_inference_steps",
                  "t_m": "modulation_timestep", "blur": "blur_sigma"}


def test_preset_table_is_emerdiff_config_presets():
    from emerdiff.config import PRESETS, EmerDiffConfig

    rows = table_with(section(readme(), "A first run"), "preset")
    kinds = [re.fullmatch(r"`(\w+)`", row["preset"]).group(1) for row in rows]
    assert sorted(kinds) == sorted(PRESETS), "one README row per preset"
    defaults = EmerDiffConfig().to_dict()
    for row, kind in zip(rows, kinds):
        for column, field in PRESET_COLUMNS.items():
            cell = row[column]
            if field not in PRESETS[kind]:  # the model's own value (SDXL's native size, its layers)
                # SD3/FLUX (issue 28): at most 512 px, t_m on the flow schedule matched to SD's 281 by SNR
                allowed = {"resolution": ("native", "native, at most 512 px"),
                           "modulation_timestep": ("SD's 281 by SNR",) if kind in ("sd3", "flux") else ()}
                assert cell in allowed.get(field, ()), (kind, column, cell)
                continue
            value = float(re.fullmatch(rf"({NUMBER})(?: px)?", cell).group(1))
            assert value == float({**defaults, **PRESETS[kind]}[field]), (kind, column, cell)


def test_reference_classes_are_the_scene_worlds():
    from emerdiff.assets.scenes import CLASSES, STUFF, THINGS

    text = section(readme(), "A first run")
    m = re.search(r"it knows (\d+) classes,\s*(.*?)\(stuff\) and (.*?)\(things\)", text, re.S)
    assert m, "the README names the reference model's classes"
    stuff, things = (re.findall(r"`(\w+)`", part) for part in (m.group(2), m.group(3)))
    assert int(m.group(1)) == len(CLASSES)
    assert tuple(stuff) == STUFF and tuple(things) == THINGS


def test_first_run_outputs_are_what_segment_writes():
    from emerdiff.cli.app import build_parser
    from emerdiff.cli.outputs import OUTPUT_SUFFIXES

    text = section(readme(), "A first run")
    m = re.search(r"emerdiff segment photo\.jpg\s+# -> (\w+)/(.*)", text)
    assert m
    segment = _subcommands(build_parser())["segment"]
    assert m.group(1) == segment.get_default("out")
    assert sorted(re.findall(r"photo(\S*?\.(?:png|npz))", m.group(2))) == sorted(OUTPUT_SUFFIXES)


def test_threads_paragraph_is_the_policy():
    from emerdiff.threads import MIN_CORES, THREADS_ENV, ThreadChoice

    text = section(readme(), "Main jobs")
    m = re.search(r"(\d+) thread on fewer than (\d+) cores, else the cores the load average leaves free", text)
    assert m and int(m.group(1)) == 1 and int(m.group(2)) == MIN_CORES
    assert f"`{THREADS_ENV}=N`" in text
    example = re.search(r"`(threads (\d+) \(auto: (\d+) cores, load ([\d.]+)\))`", text)
    assert example, "the settings line's thread part, as an example"
    threads, cores, load = int(example.group(2)), int(example.group(3)), float(example.group(4))
    assert ThreadChoice(threads, "auto", cores, load).describe() == example.group(1)
    from emerdiff.threads import auto_threads

    assert auto_threads(cores, load).threads == threads  # the example is what the policy gives
    # the commands it names are those that take --threads
    named = re.search(r"every\s+command that computes \(([^)]*)\)", text).group(1)
    from emerdiff.cli.app import build_parser

    commands = _subcommands(build_parser())
    for name in re.findall(r"`(\w+)`", named):
        assert "--threads" in commands[name].format_help(), name


# --------------------------------------------------------------------------- commands and links
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def test_every_command_and_flag_exists():
    from emerdiff.cli.app import build_parser

    commands = _subcommands(build_parser())
    text = readme()
    spans = re.findall(r"`([^`\n]+)`", text) + [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                                                 for line in block.splitlines()]
    used = 0
    for span in spans:
        for m in re.finditer(r"\bemerdiff (\w[\w-]*)((?: [^#|]*)?)", span):
            name, rest = m.group(1), m.group(2)
            assert name in commands, f"README names `emerdiff {name}`, which `emerdiff --help` does not list"
            helptext = commands[name].format_help()
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                assert flag in helptext, f"`emerdiff {name} {flag}`: no such flag"
            used += 1
        for m in re.finditer(r"\bmake ([a-z][\w-]*)", span):
            assert m.group(1) in _make_targets(), f"README names `make {m.group(1)}`, not a Makefile target"
    assert used >= 5
    # the jobs the issue lists are all there
    for job in ("emerdiff segment", "emerdiff refine", "emerdiff evaluate", "emerdiff compare", "make figures",
                "make lab", "05_inspector"):
        assert job in section(text, "Main jobs"), job


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_exist():
    text = readme()
    links = re.findall(r"\]\(([^)]+)\)", text)
    links += re.findall(r"`((?:docs|benchmarks|notebooks|emerdiff)/[\w./-]+)`", text)
    assert len(links) > 10
    for link in links:
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links {link}: {path} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links {link}: no such heading in {path}"


# --------------------------------------------------------------------------- the headline table
def _results(path: Path) -> tuple[dict, dict, dict]:
    """(mIoU by (protocol, method), difference by (protocol, 'a - b'), settings) of a held-out results .md."""
    text = path.read_text()
    miou, diff = {}, {}
    for table in tables(text):
        for row in table:
            if "mIoU" in row and "method" in row:
                lo, hi = (row["95 % interval"].strip("[]").split(", ") if row["95 % interval"] else (None, None))
                miou[(row["protocol"], row["method"])] = (row["mIoU"], lo, hi)
            if "difference (mIoU)" in row:
                lo, hi = row["95 % interval"].strip("[]").split(", ")
                diff[(row["protocol"], row["difference (mIoU)"])] = (row["value"], lo, hi)
    m = re.search(r"^settings: (\{.*\})$", text, re.M)
    return miou, diff, json.loads(m.group(1)) if m else {}


def test_headline_table_is_its_results_file():
    block = HEADLINE.search(readme())
    assert block, "the headline table sits between <!-- headline:start --> and <!-- headline:end -->"
    block = block.group(1)
    sources = re.findall(r"\]\((docs/[\w./-]+_results\.md)\)", block)
    assert len(sources) == 1, "the headline block names its one results file"
    miou, diff, settings = _results(ROOT / sources[0])
    rows = table_with(block, "protocol")
    checked = 0
    for row in rows:
        protocol = re.search(r"`(\w+)`", row["protocol"]).group(1)
        for column, cell in row.items():
            if column == "protocol":
                continue
            m = CELL.match(cell)
            assert m, f"{column}: {cell!r} is not 'value [lo, hi]'"
            key = column.lower().replace("−", "-")
            found = diff.get((protocol, key)) if " - " in key else miou.get((protocol, key))
            assert found is not None, f"{protocol} / {column} is not in {sources[0]}"
            assert m.groups() == found, f"{protocol} / {column}: README {m.groups()} vs {sources[0]} {found}"
            checked += 1
    assert checked >= 12
    # the protocols named are the file's, each with its words
    from emerdiff.cli.evaluate import KNOWN_PROTOCOL_NAMES

    assert {re.search(r"`(\w+)`", r["protocol"]).group(1) for r in rows} <= set(KNOWN_PROTOCOL_NAMES)
    # how many scenes and which settings: the file's own record of its run
    if settings:
        m = re.search(r"on its (\d+) held-out (?:test|confirmation) scenes", block)
        assert m and int(m.group(1)) == settings["scenes"]
        given = dict(s.split("=") for s in settings.get("set", []))
        from emerdiff.config import PRESETS

        t_m = int(given.get("modulation_timestep", PRESETS["reference"]["modulation_timestep"]))
        k = int(re.search(r"\bK (\d+)", block).group(1))
        assert k == settings["num_clusters"]
        assert int(re.search(r"\bt_m (\d+)", block).group(1)) == t_m
    # the words about intervals agree with the file's 'excludes 0' column
    for sentence_part, excludes in ((r"under the ([\w-]+) and ([\w-]+) protocols \(intervals exclude 0\)", True),):
        m = re.search(sentence_part, block)
        if m:
            names = {"token-mean": "concept_token_mean", "per-image": "per_image_hungarian"}
            for word in m.groups():
                protocol = names.get(word, word)
                for other in ("nearest", "bilinear"):
                    value, lo, hi = diff[(protocol, f"emerdiff - {other}")]
                    assert (float(lo) > 0) == excludes, (protocol, other, lo, hi)


# --------------------------------------------------------------------------- times
TIME = re.compile(r"~?(\d+(?:\.\d+)?) (s|min)\b")


def _source_text(cell: str) -> list[tuple[str, str]]:
    """(link, text) of each source a 'measured in' cell names; `§N` narrows RESULTS.md to section N."""
    out = []
    for m in re.finditer(r"\]\(([^)]+)\)((?: §[\w.]+)?)", cell):
        text = (ROOT / m.group(1)).read_text()
        if m.group(2):
            number = m.group(2).strip(" §")
            sec = re.search(rf"^## {re.escape(number)}\. .*?(?=^## |\Z)", text, re.M | re.S)
            assert sec, f"{m.group(1)} has no section {number}"
            text = sec.group(0)
        out.append((m.group(1) + m.group(2), text))
    return out


def test_every_time_is_in_its_measurement_file():
    rows = table_with(section(readme(), "Main jobs"), "measured in")
    checked = 0
    for row in rows:
        sources = _source_text(row["measured in"])
        for column in ("2-core CPU", "GPU"):
            for value, unit in TIME.findall(row[column]):
                assert sources, f"{row['job']}: a time with no measurement file named"
                pattern = re.compile(rf"(?<![\d.]){re.escape(value)}(?![\d])(?:\s*\(?{unit}\b| \|| s| min|\))")
                hits = [name for name, text in sources if pattern.search(text) or f"{value} {unit}" in text]
                assert hits, f"{row['job']} / {column}: {value} {unit} is in none of {[n for n, _ in sources]}"
                checked += 1
    assert checked >= 7


def test_time_check_is_not_vacuous():
    """A time that no file holds is caught."""
    text = (ROOT / "benchmarks" / "readme_jobs.md").read_text()
    assert not re.search(r"(?<![\d.])987\.6(?![\d])", text)
    assert TIME.findall("9.5 s an image, 11.4 min") == [("9.5", "s"), ("11.4", "min")]


def test_cpu_times_match_the_figures_estimate():
    """The `make figures` time is the one `make figures` itself prints first (profiles.ESTIMATES)."""
    from emerdiff.notebook.profiles import ESTIMATES

    row = next(r for r in table_with(section(readme(), "Main jobs"), "measured in") if "make figures" in r["command"])
    quick = float(re.search(r"(\d+(?:\.\d+)?) min \(quick", row["2-core CPU"]).group(1))
    full = float(re.search(r"full ~(\d+(?:\.\d+)?) min", row["2-core CPU"]).group(1))
    estimate = ESTIMATES[("reference", "cpu")]
    assert round(sum(s for s, _ in estimate["quick"].values()) / 60, 1) == quick
    assert round(sum(s for s, _ in estimate["full"].values()) / 60) == full
