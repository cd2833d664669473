"""Plots of tables: the probes' heat maps, bars and sweep lines (seaborn), and the comparison of
two evaluation runs. Every axis is named in words (:func:`emerdiff.viz.core.axis_name`), never by a
raw column key, and x tick labels are turned until they do not overlap."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from emerdiff.viz.core import _finish, axis_name, declutter_xticks, stamp_model


def _seaborn() -> tuple[Any, Any]:
    """pandas and seaborn, which the probe plots need and the core install lacks (the notebooks extra)."""
    try:
        import pandas as pd
        import seaborn as sns
    except ImportError as e:
        raise ImportError(f"the probe plots need seaborn and pandas ({e.name} is missing): "
                          "pip install 'emerdiff[notebooks]'") from e
    return pd, sns


def _name(key: str, names: Mapping[str, str] | None, width: int = 0) -> str:
    """The words for column ``key``: ``names`` first, then :data:`AXIS_NAMES`; wrapped at ``width``."""
    text = (names or {}).get(key) or axis_name(key)
    return textwrap.fill(text, width) if width else text


def _finish_plot(fig: Any, axes: Sequence[Any], model: str, note: str = "") -> Any:
    """Tight layout, x tick labels turned until they do not overlap, and the layout again (turned
    labels are taller), then the model footer."""
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    for ax in axes:
        declutter_xticks(ax)
    return _finish(fig, model, note)


def probe_heatmap(rows: Sequence[Mapping[str, Any]], index: str, columns: str, value: str, model: str,
                  title: str, fmt: str = ".2f", ax: Any = None, names: Mapping[str, str] | None = None) -> Any:
    """Seaborn heat map of ``value`` averaged over rows sharing (index, columns).

    Axes and colour bar are named by :func:`axis_name` of the columns (``names`` overrides it); the
    cells are as wide as the longest column label needs.
    """
    import matplotlib.pyplot as plt

    pd, sns = _seaborn()

    df = pd.DataFrame(list(rows))
    table = df.pivot_table(index=index, columns=columns, values=value, aggfunc="mean", sort=False)
    if ax is None:
        widest = max((len(str(c)) for c in table.columns), default=4)
        cell = max(0.9, 0.075 * widest + 0.25)  # ~0.075 in per character at 9 pt
        fig, ax = plt.subplots(figsize=(2.8 + cell * max(table.shape[1], 2), 1.6 + 0.3 * max(table.shape[0], 2)))
    else:
        fig = ax.figure
    sns.heatmap(table, annot=True, fmt=fmt, cmap="viridis", ax=ax,
                cbar_kws={"label": _name(value, names, 28)})
    ax.set_xlabel(_name(columns, names))
    ax.set_ylabel(_name(index, names, 30))
    ax.set_title(title)
    return _finish_plot(fig, [ax], model)


def probe_bars(rows: Sequence[Mapping[str, Any]], x: str, y: str, model: str, title: str,
               hue: str | None = None, rotate: bool = True, names: Mapping[str, str] | None = None) -> Any:
    """Seaborn bar plot of ``y`` per ``x`` (mean and spread over the rows sharing x).

    Axes and legend are named by :func:`axis_name` (``names`` overrides it). ``rotate``: small x
    tick labels (many bars); either way they are turned until they do not overlap.
    """
    import matplotlib.pyplot as plt

    pd, sns = _seaborn()

    df = pd.DataFrame(list(rows))
    n = df[x].nunique()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2), 3.8))
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax, errorbar="sd")
    if rotate:
        ax.tick_params(axis="x", labelsize=6)
    ax.set_xlabel(_name(x, names))
    ax.set_ylabel(_name(y, names, 34))
    if hue is not None and ax.get_legend() is not None:
        ax.get_legend().set_title(_name(hue, names))
    ax.set_title(title)
    return _finish_plot(fig, [ax], model, "bars: mean, whiskers: sd over images and seeds")


def sweep_lines(rows: Sequence[Mapping[str, Any]], x: str, ys: Sequence[str], model: str, title: str,
                hue: str | None = None, names: Mapping[str, str] | None = None,
                reference: Mapping[str, float] | None = None, logx: bool = False) -> Any:
    """One panel per metric in ``ys``: line of the mean over images/seeds vs ``x`` with a sd band.

    Axes and legends are named by :func:`axis_name` (``names`` overrides it); a metric that is NaN
    throughout gets no panel. ``reference``: per metric, a level drawn dashed (e.g. chance);
    ``logx``: a log x axis.
    """
    import matplotlib.pyplot as plt

    pd, sns = _seaborn()

    df = pd.DataFrame(list(rows))
    ys = [y for y in ys if y in df and df[y].notna().any()]
    fig, axes = plt.subplots(1, max(len(ys), 1), figsize=(3.6 * max(len(ys), 1), 3.4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        sns.lineplot(data=df, x=x, y=y, hue=hue, marker="o", errorbar="sd", ax=ax)
        if reference is not None and y in reference:
            ax.axhline(reference[y], color="grey", linestyle="--", linewidth=1, label="chance")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(_name(x, names))
        ax.set_ylabel(_name(y, names, 30))
        if hue is not None and ax.get_legend() is not None:
            ax.get_legend().set_title(_name(hue, names))
    fig.suptitle(title)
    note = "lines: mean, bands: sd over images and seeds" + (", dashed: chance" if reference else "")
    return _finish_plot(fig, list(axes[0]), model, note)


# ------------------------------------------------------------------ evaluation
def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _xerr(v: Mapping[str, Any]) -> list[list[float]] | None:
    """matplotlib's asymmetric error of an interval dict (None without an interval)."""
    if not (_finite(v["lo"]) and _finite(v["hi"])):
        return None
    return [[v["value"] - v["lo"]], [v["hi"] - v["value"]]]


def comparison_figure(comparison: Mapping[str, Any], model: str, names: Sequence[str] = ("A", "B"),
                      protocols: Sequence[str] | None = None, note: str = "") -> Any:
    """Two evaluation runs side by side: mIoU of A and B and their difference, with intervals.

    ``comparison`` is what :func:`emerdiff.evaluation.compare.compare_runs` returns (``emerdiff compare
    --json``; NaN or None bounds both mean "no interval"). One column per protocol. Top row: one
    horizontal bar per method and run (A blue, B orange), its error bar the run's interval.
    Bottom row: A - B per method both runs have, a dot with its paired interval, black where the
    interval excludes 0. A method missing from one run has no bar there.

    Args:
        comparison: ``{"rows": [{"protocol", "method", "a", "b", "a-b"}, ...], "shared_images",
            "bootstrap": {"level", ...}}``; each of a, b, a-b ``{"value", "lo", "hi"}`` or None.
        model: the model named in the footer.
        names: what A and B are (legend and title).
        protocols: the columns, in order (default: every protocol of the rows).
        note: appended to the footer (e.g. which scenes).
    """
    import matplotlib.pyplot as plt

    if len(names) != 2:
        raise ValueError(f"names: give two names, one for run A and one for run B; got {list(names)}")
    held = list(dict.fromkeys(r["protocol"] for r in comparison["rows"]))
    protocols = held if protocols is None else list(protocols)
    missing = [p for p in protocols if p not in held]
    if missing or not protocols:
        raise ValueError(f"the comparison has no rows for protocol(s) {missing or protocols}; it holds {held}")
    rows = {(r["protocol"], r["method"]): r for r in comparison["rows"] if r["protocol"] in protocols}
    methods = list(dict.fromkeys(m for _, m in rows))
    # the same rows in every bottom panel (their y axes are shared): methods with a difference anywhere
    both = [m for m in methods if any(rows.get((p, m), {}).get("a-b") is not None for p in protocols)]
    fig, axes = plt.subplots(2, len(protocols), figsize=(3.8 * len(protocols), 6.2), sharey="row", squeeze=False)
    for j, protocol in enumerate(protocols):
        top, bottom = axes[0, j], axes[1, j]
        for k, (side, color) in enumerate((("a", "tab:blue"), ("b", "tab:orange"))):
            labelled = False
            for i, method in enumerate(methods):
                v = rows.get((protocol, method), {}).get(side)
                if v is None or not _finite(v["value"]):
                    continue
                top.barh(i + (k - 0.5) * 0.35, v["value"], height=0.33, color=color, xerr=_xerr(v), capsize=2,
                         label=None if labelled else f"{side.upper()}: {names[k]}")
                labelled = True
        for y, method in enumerate(both):
            d = rows.get((protocol, method), {}).get("a-b")
            if d is None or not _finite(d["value"]):
                continue
            excludes0 = _xerr(d) is not None and (d["lo"] > 0 or d["hi"] < 0)
            bottom.errorbar(d["value"], y, xerr=_xerr(d), fmt="o", color="black" if excludes0 else "grey", capsize=3)
        bottom.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        bottom.set_yticks(range(len(both)), both)
        top.set_yticks(range(len(methods)), methods)
        top.set_title(protocol.replace("_", " "))
        top.set_xlabel("mIoU (%)")
        bottom.set_xlabel("A - B (mIoU points)")
    for ax in axes[:, 0]:  # the first method on top; once per row: the row shares its y axis, and
        ax.invert_yaxis()  # inverting every panel flips it back for an even number of protocols
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="lower right", ncol=2, fontsize=8)
    boot = comparison.get("bootstrap") or {}
    spread = (f"{round(boot.get('level', 0.95) * 100)} % paired bootstrap intervals"
              if boot.get("resamples", 1) else "no intervals (0 resamples)")
    fig.suptitle(f"A = {names[0]} vs B = {names[1]}: {comparison['shared_images']} shared images, {spread}")
    stamp_model(fig, model, note)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the bottom strip: footer and legend
    return fig


