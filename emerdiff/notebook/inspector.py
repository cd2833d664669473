"""Interactive perturbation inspector (ipywidgets + ipympl) for JupyterLab.

    %matplotlib widget
    from emerdiff.notebook.inspector import Inspector
    Inspector(EmerDiff(model, config), {"cat": "cat.png"}).widget

Pick an image, choose a segment by clicking on the image or from the list,
move the lambda / modulation-timestep sliders or change the modulation layer:
I+, I-, the difference map of the chosen segment and the full-resolution
labels of all segments update. The controls sit in a column beside the figure
(two rows of three square panels), so every slider and the panels it changes
are on screen together in a 1400x900 window with JupyterLab's file browser
open; a busy label in that column says when a recompute is running.
lambda = 0 perturbs nothing: the panels say so instead of showing a black map.
Every panel colours segment ``i`` with ``viz.palette(K)[i]``: the segment
panel shows the low-res segments in the labels panel's colours (the photo is
the I0 panel).

Cost model: :meth:`EmerDiff.prepare` (encode, inversion up to the *largest*
timestep the slider offers, k-means) runs once per image and is cached. A
change of lambda, t_m or layer first runs only the *chosen* segment's +/-lambda
pair (``mask_ids=[i]``: 3 batch elements with the unmodulated run, instead of
2K + 1) and draws it; the labels panel meanwhile shows the last complete
labels, titled "stale" with the setting they belong to. The other segments'
runs then follow lazily in chunks (scheduled on the kernel's event loop, so
a slider move that arrives in between supersedes them), and the labels panel
turns current when all K pairs of the setting exist. ``lazy_labels=False``
restores the old behaviour (all 2K runs in one batch on every change). Without
an event loop (plain Python, tests) nothing is deferred: call
:meth:`complete_labels`, or pass ``defer`` (a callable taking a no-argument
function) to schedule the completion yourself. Choosing another segment costs
nothing once its pair exists (every pair of the last few settings is cached).

For tests and scripts every widget is an attribute (``image_dropdown``,
``segment_select``, ``lambda_slider``, ``timestep_slider``, ``layer_dropdown``)
and what is on screen is in ``displayed`` (numpy arrays); ``busy_log`` records
every busy message shown (``busy`` is the label). Errors raised in a
callback are appended to ``errors`` and written to the ``log`` Output widget
instead of vanishing in the kernel log.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from emerdiff.method.pipeline import EmerDiff, PreparedImage
from emerdiff.sd.images import resize_labels
from emerdiff.studies.probes import Perturbation, candidate_layers, perturb_images, short_layer
from emerdiff.viz import HEATMAP_CMAP, highlight_mask, palette, stamp_model

PANELS = ("image", "plus", "minus", "difference", "labels", "unmodulated")
# Figure geometry in inches at 100 dpi: square panels, room above each for a two-line title. 6.2 x 5.12 in
# (620 x 512 px) plus a 300 px control column fits JupyterLab's notebook area at a 1400x900 window.
DPI = 100
PANEL_IN, GAP_IN, SIDE_IN, TITLE_IN, TOP_IN, BOTTOM_IN = 2.0, 0.06, 0.04, 0.34, 0.28, 0.16
FIGSIZE = (2 * SIDE_IN + 3 * PANEL_IN + 2 * GAP_IN, TOP_IN + 2 * (TITLE_IN + PANEL_IN) + BOTTOM_IN)
CONTROLS_WIDTH = "300px"
IDLE = "<span style='color:#2a7a2a'>ready</span>"
OUTLINE = (0, 0, 0)  # the chosen segment's outline: black is not a palette colour
LAZY_CHUNK = 4  # segments per deferred labels batch: ~1.5 s on the reference model's CPU, so a queued move waits little
LAZY_DELAY_S = 0.05  # lets the frontend fetch the preview and queued widget messages arrive before a deferred batch


LAMBDA_ZERO_NOTE = ("lambda = 0 perturbs nothing: I+ = I- = I0, the difference map is zero and the labels "
                    "are undefined; move the slider away from 0")


def panel_rects() -> dict[str, tuple[float, float, float, float]]:
    """(left, bottom, width, height) of each panel in figure fractions: two rows of three squares."""
    w, h = FIGSIZE
    rects = {}
    for i, name in enumerate(PANELS):
        row, col = divmod(i, 3)
        left = SIDE_IN + col * (PANEL_IN + GAP_IN)
        bottom = BOTTOM_IN + (1 - row) * (PANEL_IN + TITLE_IN)
        rects[name] = (left / w, bottom / h, PANEL_IN / w, PANEL_IN / h)
    return rects


def panel_titles(segment: int, strength: float) -> dict[str, str]:
    """Panel titles for a segment and lambda; at lambda 0 they say why the maps are empty."""
    if strength == 0:
        return {"image": f"segments (chosen: {segment})", "plus": "I+ = I0\n(lambda = 0: no perturbation)",
                "minus": "I- = I0 (lambda = 0)", "difference": "||I- - I+|| = 0 at lambda = 0",
                "labels": "labels undefined at lambda = 0", "unmodulated": "I0 (unperturbed reconstruction)"}
    return {"image": f"segments (chosen: {segment})", "plus": f"I+ (c = {strength:+g})",
            "minus": f"I- (c = {-strength:+g})",
            "difference": "||I- - I+||", "labels": "EmerDiff labels (all segments)",
            "unmodulated": "I0 (unperturbed reconstruction)"}


def stale_title(shown: tuple, current: tuple, done: int, total: int) -> str:
    """Title of a labels panel showing labels of setting ``shown`` while ``current`` is on the sliders.

    Settings are (image, lambda, t_m, layer); the title names what differs and how many of the
    current setting's segment pairs exist so far.
    """
    _, lam, t, layer = shown
    diff = [f"lambda {lam:g}" if lam != current[1] else "", f"t_m {t}" if t != current[2] else "",
            short_layer(layer) if layer != current[3] else ""]
    return f"STALE labels of {', '.join(d for d in diff if d)}\n({done}/{total} segments at this setting)"


@dataclass
class SettingRuns:
    """The decoded runs of one (image, lambda, t_m, layer) setting, filled one segment pair at a time."""

    plus: dict[int, torch.Tensor] = field(default_factory=dict)  # segment -> (3, R, R) in [0, 1], unclipped
    minus: dict[int, torch.Tensor] = field(default_factory=dict)
    unmodulated: torch.Tensor | None = None
    labels: np.ndarray | None = None  # set once every segment's pair exists

    def perturbation(self, ids: Sequence[int]) -> Perturbation:
        return Perturbation(plus=torch.stack([self.plus[i] for i in ids]),
                            minus=torch.stack([self.minus[i] for i in ids]), unmodulated=self.unmodulated)


class Inspector:
    """Widget inspector of EmerDiff's perturbations.

    Args:
        ed: an :class:`EmerDiff` (model + base config; its lambda, t_m and layer are the start values).
        images: ``{name: image}`` (anything :func:`emerdiff.load_image` takes) or a sequence of images.
        timesteps: timesteps the slider offers (default: every schedule timestep <= the config's t_m).
        layers: modulation layers of the dropdown (default: every cross-attention layer).
        strength_range: (min, max, step) of the lambda slider.
        cache_size: number of (image, lambda, t, layer) settings whose runs are kept.
        lazy_labels: a change runs the chosen segment's pair first and the rest later (True), or
            all 2K runs at once (False, the full recompute).
        defer: how to run the rest later, ``defer(fn)``; None: the running asyncio loop if any
            (the Jupyter kernel's), else nothing (call :meth:`complete_labels`).
    """

    def __init__(
        self,
        ed: EmerDiff,
        images: Mapping[str, Any] | Sequence[Any],
        timesteps: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        strength_range: tuple[float, float, float] = (-100.0, 100.0, 0.5),
        cache_size: int = 8,
        lazy_labels: bool = True,
        defer: Callable[[Callable[[], None]], Any] | None = None,
    ) -> None:
        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        self.ed = ed
        cfg = ed.config
        self.images = dict(images) if isinstance(images, Mapping) else {f"image {i}": im for i, im in enumerate(images)}
        if not self.images:
            raise ValueError("the inspector needs at least one image")
        schedule = ed.schedule.timesteps
        ts = list(timesteps) if timesteps is not None else [t for t in schedule if t <= cfg.modulation_timestep]
        bad = [t for t in ts if t not in schedule]
        if bad or not ts:
            raise ValueError(f"slider timesteps {bad or ts} are not on the schedule {schedule}")
        self.timesteps = sorted(set(int(t) for t in ts))
        # prepare once per image up to the largest slider timestep: every slider position is then inverted
        self.t_stop = max(self.timesteps)
        self.layers = list(layers) if layers is not None else candidate_layers(ed, "cross")
        if cfg.modulation_layer not in self.layers:
            self.layers.append(cfg.modulation_layer)
        self.cache_size = cache_size
        self.lazy_labels = lazy_labels
        self.defer = defer
        self._prepared: dict[str, PreparedImage] = {}
        self._runs: OrderedDict[tuple, SettingRuns] = OrderedDict()
        self._latest_labels: dict[str, tuple[tuple, np.ndarray]] = {}  # image -> last complete (setting, labels)
        # prepare: images prepared; perturb: UNet batches run; runs: (segment, sign) runs in them
        self.calls = {"prepare": 0, "perturb": 0, "runs": 0}
        self.errors: list[str] = []
        self.displayed: dict[str, np.ndarray] = {}
        self.labels_current = False  # does the labels panel show the current setting's labels?
        self._suspend = False
        self._pending: tuple | None = None  # the setting whose deferred labels batch is scheduled

        lo, hi, step = strength_range
        row = {"width": CONTROLS_WIDTH}
        self.image_dropdown = widgets.Dropdown(options=list(self.images), description="image", layout=row)
        self.segment_select = widgets.Dropdown(options=[("segment 0", 0)], value=0, description="segment",
                                               layout=row)
        self.lambda_slider = widgets.FloatSlider(value=float(np.clip(cfg.modulation_strength, lo, hi)), min=lo, max=hi,
                                                 step=step, description="lambda", continuous_update=False, layout=row)
        start_t = cfg.modulation_timestep if cfg.modulation_timestep in self.timesteps else self.t_stop
        self.timestep_slider = widgets.SelectionSlider(options=self.timesteps, value=start_t, description="t_m",
                                                       continuous_update=False, layout=row)
        self.layer_dropdown = widgets.Dropdown(options=[(short_layer(n), n) for n in self.layers],
                                               value=cfg.modulation_layer, description="layer", layout=row)
        self.status = widgets.HTML(layout=row)
        self.busy = widgets.HTML(value=IDLE, layout=row)
        self.busy_log: list[str] = []
        self.log = widgets.Output(layout={"border": "1px solid #ddd", "max_height": "12em", "overflow": "auto"})

        with plt.ioff():
            self.fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
        # fixed square rects (not subplots): the browser test maps a panel to canvas pixels with panel_rects()
        self.axes = {name: self.fig.add_axes(rect) for name, rect in panel_rects().items()}
        for ax in self.axes.values():
            ax.set_xticks([])
            ax.set_yticks([])
        stamp_model(self.fig, ed.model.source)
        self._artists: dict[str, Any] = {}
        self.fig.canvas.mpl_connect("button_press_event", self._guard(self._on_click))

        self.image_dropdown.observe(self._guard(self._on_image), names="value")
        for w in (self.segment_select, self.lambda_slider, self.timestep_slider, self.layer_dropdown):
            w.observe(self._guard(lambda change: self.update()), names="value")

        canvas = self.fig.canvas
        # ipympl's canvas is itself a widget; any other backend gets a static re-display in an Output
        self._static = not isinstance(canvas, widgets.DOMWidget)
        self.view = widgets.Output() if self._static else canvas
        if not self._static:
            # no "Figure 1" header (the suptitle names the view), no coordinate footer, and no toolbar:
            # ipympl's default toolbar floats over the left edge of the clickable segment panel
            canvas.header_visible = False
            canvas.footer_visible = False
            canvas.toolbar_visible = False
            # a fixed size: beside the controls the canvas would otherwise be squeezed by the flex row
            # (+8 px: ipympl's 2 px canvas margin would otherwise add scroll bars)
            canvas.layout = widgets.Layout(width=f"{round(FIGSIZE[0] * DPI) + 8}px", flex="0 0 auto")
        controls = widgets.VBox([self.image_dropdown, self.segment_select, self.layer_dropdown, self.lambda_slider,
                                 self.timestep_slider, self.busy, self.status],
                                layout={"width": CONTROLS_WIDTH, "flex": "0 0 auto", "overflow": "hidden"})
        self.widget = widgets.VBox([widgets.HBox([controls, self.view]), self.log])
        self._guard(self._on_image)(None)

    # ------------------------------------------------------------------ state
    @property
    def image_name(self) -> str:
        return self.image_dropdown.value

    @property
    def prepared(self) -> PreparedImage:
        """The cached preparation of the current image (computed on first use)."""
        name = self.image_name
        if name not in self._prepared:
            self.calls["prepare"] += 1
            self._set_busy(f"preparing {name}...")
            try:
                self._prepared[name] = self.ed.prepare(self.images[name], t_stop=self.t_stop)
            finally:
                self._set_busy(None)
        return self._prepared[name]

    @property
    def num_segments(self) -> int:
        return self.prepared.segments.num_segments

    def settings(self) -> tuple[str, float, int, str]:
        return (self.image_name, float(self.lambda_slider.value), int(self.timestep_slider.value),
                self.layer_dropdown.value)

    def cache_info(self) -> dict[str, Any]:
        return {"prepared": list(self._prepared), "results": len(self._runs), **self.calls}

    def missing(self, key: tuple | None = None) -> list[int]:
        """Segments whose +/-lambda pair is not computed yet for a setting (default: the current one)."""
        key = key or self.settings()
        runs = self._runs.get(key)
        done = runs.plus if runs is not None else {}
        return [i for i in range(self._prepared[key[0]].segments.num_segments) if i not in done]

    # ------------------------------------------------------------------ compute
    def _entry(self, key: tuple) -> SettingRuns:
        if key not in self._runs:
            self._runs[key] = SettingRuns()
        self._runs.move_to_end(key)
        while len(self._runs) > self.cache_size:
            self._runs.popitem(last=False)
        return self._runs[key]

    def compute(self, ids: Sequence[int], key: tuple | None = None) -> SettingRuns:
        """Run the +/-lambda pairs of segments ``ids`` (those not cached) in one batch; the labels of
        the setting follow once every segment's pair exists."""
        key = key or self.settings()
        name, lam, t, layer = key
        prep = self._prepared[name]
        entry = self._entry(key)
        todo = [int(i) for i in ids if int(i) not in entry.plus]
        if todo:
            self.calls["perturb"] += 1
            self.calls["runs"] += 2 * len(todo)
            what = f"segment {todo[0]}" if len(todo) == 1 else f"{len(todo)} segments"
            self._set_busy(f"computing {2 * len(todo)} runs ({what})...")  # short: one line in the column
            try:
                pert = perturb_images(self.ed, prep, todo, modulation_strength=lam, modulation_layer=layer,
                                      modulation_timestep=t)
            finally:
                self._set_busy(None)
            for j, i in enumerate(todo):
                entry.plus[i], entry.minus[i] = pert.plus[j], pert.minus[j]
            if entry.unmodulated is None:
                entry.unmodulated = pert.unmodulated
        k = prep.segments.num_segments
        if entry.labels is None and len(entry.plus) == k:
            entry.labels = self.ed.readout(entry.perturbation(range(k)).difference("pair"), prep)
            self._latest_labels[name] = (key, entry.labels)
        return entry

    def result(self) -> tuple[Perturbation, np.ndarray]:
        """I+/I-/I0 of every segment and the full labels (model resolution) for the current settings,
        computing every missing pair (one batch)."""
        key = self.settings()
        entry = self.compute(self.missing(key), key)
        return entry.perturbation(range(self.num_segments)), entry.labels

    def complete_labels(self) -> bool:
        """Compute every missing pair of the current setting now (one batch) and redraw; True if any ran."""
        if not self.missing():
            return False
        self.compute(self.missing())
        self.update()
        return True

    def _lazy_step(self, key: tuple) -> None:
        """One deferred chunk of the labels of setting ``key``; dropped if the sliders moved on."""
        if self._pending == key:
            self._pending = None
        if key != self.settings():
            return  # superseded: the new setting scheduled its own completion
        todo = self.missing(key)
        if not todo:
            return
        self.compute(todo[:LAZY_CHUNK], key)
        self.update()  # redraws and, while pairs are missing, schedules the next chunk

    def _schedule(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` after the current callback has returned (so the preview reaches the browser and
        a queued slider move is handled first); False when there is no way to defer."""
        if self.defer is not None:
            self.defer(fn)
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_later(LAZY_DELAY_S, fn)
        return True

    def _set_busy(self, message: str | None) -> None:
        """Show (or clear, with None) the busy label; a widget change reaches the browser at once,
        before the blocking computation starts."""
        if message is None:
            self.busy.value = IDLE
            return
        self.busy_log.append(message)
        self.busy.value = f"<span style='color:#b35900; white-space:nowrap'>&#9679; {message}</span>"

    # ------------------------------------------------------------------ callbacks
    def _guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Run a callback; on error keep the traceback in ``errors`` and show it in ``log``."""

        def wrapped(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:  # a widget callback must never die silently
                text = traceback.format_exc()
                self.errors.append(f"{type(err).__name__}: {err}")
                self.log.append_stderr(text)
                self.status.value = f"<b style='color:#b00'>error:</b> {type(err).__name__}: {err}"
                return None

        return wrapped

    def _on_image(self, change: Any) -> None:
        n = self.num_segments  # prepares (cached) the new image
        self._suspend = True
        try:
            self.segment_select.options = [(f"segment {i}", i) for i in range(n)]
            self.segment_select.value = 0
        finally:
            self._suspend = False
        self.update()

    def _on_click(self, event: Any) -> None:
        if event.inaxes is not self.axes["image"] or event.xdata is None or event.ydata is None:
            return
        self.select_at(event.xdata, event.ydata)

    def segment_at(self, x: float, y: float) -> int:
        """Segment id under pixel (x, y) of the displayed image (model resolution)."""
        seg = self.prepared.segments.labels
        res = self.ed.config.resolution
        row = int(np.clip(y * seg.shape[0] / res, 0, seg.shape[0] - 1))
        col = int(np.clip(x * seg.shape[1] / res, 0, seg.shape[1] - 1))
        return int(seg[row, col])

    def select_at(self, x: float, y: float) -> int:
        """Choose the segment under (x, y), as a click on the image does; returns its id."""
        sid = self.segment_at(x, y)
        self.segment_select.value = sid
        return sid

    # ------------------------------------------------------------------ drawing
    def update(self) -> None:
        """Compute what the current widget values need (or fetch it from the cache) and redraw.

        The chosen segment's pair is computed now; with ``lazy_labels`` the others are deferred and
        the labels panel shows the image's last complete labels, marked stale, until they exist.
        """
        if self._suspend:
            return
        res = self.ed.config.resolution
        prep = self.prepared
        key = self.settings()
        name, lam, t, layer = key
        sid = int(self.segment_select.value)
        k = prep.segments.num_segments
        if not self.lazy_labels or name not in self._latest_labels:
            entry = self.compute(self.missing(key), key)  # full recompute: every pair in one batch
        else:
            entry = self.compute([sid], key)
        labels_key, labels = (key, entry.labels) if entry.labels is not None else self._latest_labels[name]
        self.labels_current = labels_key == key
        pert = entry.perturbation([sid])
        lowres = resize_labels(prep.segments.labels, (res, res))
        diff = pert.difference("pair")[0].numpy()
        colours = palette(k)  # one palette for segment ids in every panel
        self.displayed = {
            "image": highlight_mask(colours[lowres], lowres == sid, color=OUTLINE, dim=1.0),
            "plus": pert.plus[0].clamp(0, 1).permute(1, 2, 0).numpy(),
            "minus": pert.minus[0].clamp(0, 1).permute(1, 2, 0).numpy(),
            "difference": diff,
            "labels": labels,
            "unmodulated": entry.unmodulated.clamp(0, 1).permute(1, 2, 0).numpy(),
        }
        titles = panel_titles(sid, lam)
        done = k - len(self.missing(key))
        if not self.labels_current and lam != 0:
            titles["labels"] = stale_title(labels_key, key, done, k)
        shown = dict(self.displayed, labels=colours[labels])
        for panel, ax in self.axes.items():
            arr = shown[panel]
            if panel not in self._artists:
                kw = {"cmap": HEATMAP_CMAP} if panel == "difference" else {}
                self._artists[panel] = ax.imshow(arr, interpolation="nearest", **kw)
            else:
                self._artists[panel].set_data(arr)
            stale = panel == "labels" and not self.labels_current and lam != 0
            ax.set_title(titles[panel], fontsize=8, color="#b00" if stale else "black")
        self._artists["difference"].set_clim(0, max(float(diff.max()), 1e-6))
        self.fig.suptitle(f"{name}  ·  t_m={t}  ·  {short_layer(layer)}", fontsize=10)
        if self._static:
            self.fig.canvas.draw()
            self._show_static()
        else:
            self.fig.canvas.draw_idle()
        loc = float((diff ** 2 * (lowres == sid)).sum() / max(float((diff ** 2).sum()), 1e-12))
        note = f"<b>{LAMBDA_ZERO_NOTE}</b> · " if lam == 0 else ""
        if self.labels_current:
            state = "labels: current"
        else:
            state = f"labels: <b style='color:#b00'>stale</b> ({done}/{k} segments at this setting)"
            if lam != 0 and self._pending != key and self._schedule(lambda: self._guard(self._lazy_step)(key)):
                self._pending = key
        self.status.value = (f"{note}segment {sid}: locality {loc:.2f} · {state} · cache: {len(self._prepared)} "
                             f"image(s), {len(self._runs)} setting(s) · UNet batches: {self.calls['perturb']}, "
                             f"runs: {self.calls['runs']}")

    def _show_static(self) -> None:
        """Non-widget backends: re-display the figure in the Output view."""
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:  # plain Python (scripts, tests): nothing to show
            return
        self.view.clear_output(wait=True)
        with self.view:
            display(self.fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

