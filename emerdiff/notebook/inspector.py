"""Interactive perturbation inspector (ipywidgets + ipympl) for JupyterLab.

    %matplotlib widget
    from emerdiff.notebook.inspector import Inspector
    Inspector(EmerDiff(model, config), {"cat": "cat.png"}).widget

Pick an image, choose a segment by clicking on the image or from the list,
move the lambda / modulation-timestep sliders or change the modulation layer:
I+, I-, the difference map of the chosen segment and the full-resolution
labels of all segments update. The panels sit in two rows of three (under
1000 px wide, so they fit beside JupyterLab's file browser); a busy label
next to the sliders says when a recompute (a few seconds on a CPU) is running.
lambda = 0 perturbs nothing: the panels say so instead of showing a black map.

Cost model: :meth:`EmerDiff.prepare` (encode, inversion up to the *largest*
timestep the slider offers, k-means) runs once per image and is cached, so a
slider move costs only one batched modulated denoising (all segments, both
signs) and the decodes; choosing another segment costs nothing (the results of
the last few settings are cached too).

For tests and scripts every widget is an attribute (``image_dropdown``,
``segment_select``, ``lambda_slider``, ``timestep_slider``, ``layer_dropdown``)
and what is on screen is in ``displayed`` (numpy arrays); ``busy_log`` records
every busy message shown (``busy`` is the label). Errors raised in a
callback are appended to ``errors`` and written to the ``log`` Output widget
instead of vanishing in the kernel log.
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from emerdiff.method.pipeline import EmerDiff, PreparedImage
from emerdiff.sd.images import resize_labels
from emerdiff.studies.probes import Perturbation, candidate_layers, perturb_images, short_layer
from emerdiff.viz import HEATMAP_CMAP, colorize, highlight_mask, overlay, resize_image, stamp_model

PANELS = ("image", "plus", "minus", "difference", "labels", "unmodulated")
FIGSIZE = (9.0, 6.3)  # inches at 100 dpi
IDLE = "<span style='color:#2a7a2a'>ready</span>"


LAMBDA_ZERO_NOTE = ("lambda = 0 perturbs nothing: I+ = I- = I0, the difference map is zero and the labels "
                    "are undefined; move the slider away from 0")


def panel_titles(segment: int, strength: float) -> dict[str, str]:
    """Panel titles for a segment and lambda; at lambda 0 they say why the maps are empty."""
    if strength == 0:
        return {"image": f"segments (chosen: {segment})", "plus": "I+ = I0 (lambda = 0: no perturbation)",
                "minus": "I- = I0 (lambda = 0)", "difference": "||I- - I+|| = 0 at lambda = 0",
                "labels": "labels undefined at lambda = 0", "unmodulated": "I0 (unperturbed reconstruction)"}
    return {"image": f"segments (chosen: {segment})", "plus": f"I+ (c = {strength:+g})",
            "minus": f"I- (c = {-strength:+g})",
            "difference": "||I- - I+||", "labels": "EmerDiff labels (all segments)",
            "unmodulated": "I0 (unperturbed reconstruction)"}


class Inspector:
    """Widget inspector of EmerDiff's perturbations.

    Args:
        ed: an :class:`EmerDiff` (model + base config; its lambda, t_m and layer are the start values).
        images: ``{name: image}`` (anything :func:`emerdiff.load_image` takes) or a sequence of images.
        timesteps: timesteps the slider offers (default: every schedule timestep <= the config's t_m).
        layers: modulation layers of the dropdown (default: every cross-attention layer).
        strength_range: (min, max, step) of the lambda slider.
        cache_size: number of (image, lambda, t, layer) results kept.
    """

    def __init__(
        self,
        ed: EmerDiff,
        images: Mapping[str, Any] | Sequence[Any],
        timesteps: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        strength_range: tuple[float, float, float] = (-100.0, 100.0, 0.5),
        cache_size: int = 8,
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
        self._prepared: dict[str, PreparedImage] = {}
        self._results: OrderedDict[tuple, tuple[Perturbation, np.ndarray]] = OrderedDict()
        self.calls = {"prepare": 0, "perturb": 0}
        self.errors: list[str] = []
        self.displayed: dict[str, np.ndarray] = {}
        self._suspend = False

        lo, hi, step = strength_range
        self.image_dropdown = widgets.Dropdown(options=list(self.images), description="image")
        self.segment_select = widgets.Dropdown(options=[("segment 0", 0)], value=0, description="segment")
        self.lambda_slider = widgets.FloatSlider(value=float(np.clip(cfg.modulation_strength, lo, hi)), min=lo, max=hi,
                                                 step=step, description="lambda", continuous_update=False)
        start_t = cfg.modulation_timestep if cfg.modulation_timestep in self.timesteps else self.t_stop
        self.timestep_slider = widgets.SelectionSlider(options=self.timesteps, value=start_t, description="t_m",
                                                       continuous_update=False)
        self.layer_dropdown = widgets.Dropdown(options=[(short_layer(n), n) for n in self.layers],
                                               value=cfg.modulation_layer, description="layer")
        self.status = widgets.HTML()
        self.busy = widgets.HTML(value=IDLE, layout={"min_width": "16em"})
        self.busy_log: list[str] = []
        self.log = widgets.Output(layout={"border": "1px solid #ddd", "max_height": "12em", "overflow": "auto"})

        with plt.ioff():
            # two rows of three at 100 dpi: 900 px wide, fits ~1000 px with the file browser open
            self.fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=100)
        self.axes = dict(zip(PANELS, axes.flat))
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        self.fig.subplots_adjust(left=0.01, right=0.99, bottom=0.04, top=0.9, wspace=0.04, hspace=0.14)
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
            canvas.header_visible = False  # ipympl's "Figure 1" line: the suptitle already names the view
        self.widget = widgets.VBox([
            widgets.HBox([self.image_dropdown, self.segment_select, self.layer_dropdown]),
            widgets.HBox([self.lambda_slider, self.timestep_slider, self.busy]),
            self.view, self.status, self.log,
        ], layout={"max_width": "1000px"})
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
        return {"prepared": list(self._prepared), "results": len(self._results), **self.calls}

    # ------------------------------------------------------------------ compute
    def result(self) -> tuple[Perturbation, np.ndarray]:
        """I+/I-/I0 of every segment and the full labels (model resolution) for the current settings."""
        key = self.settings()
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        _, lam, t, layer = key
        self.calls["perturb"] += 1
        self._set_busy(f"computing {2 * self.num_segments} modulated runs...")  # short: one line, no reflow
        try:
            pert = perturb_images(self.ed, self.prepared, modulation_strength=lam, modulation_layer=layer,
                                  modulation_timestep=t)
            labels = self.ed.readout(pert.difference("pair"), self.prepared)
        finally:
            self._set_busy(None)
        self._results[key] = (pert, labels)
        while len(self._results) > self.cache_size:
            self._results.popitem(last=False)
        return pert, labels

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
        """Recompute (or fetch from the cache) and redraw for the current widget values."""
        if self._suspend:
            return
        res = self.ed.config.resolution
        prep = self.prepared
        sid = int(self.segment_select.value)
        pert, labels = self.result()
        img = resize_image(prep.image, (res, res))
        lowres = resize_labels(prep.segments.labels, (res, res))
        diff = pert.difference("pair")[sid].numpy()
        self.displayed = {
            "image": highlight_mask(overlay(img, lowres, 0.35), prep.segments.labels == sid),
            "plus": pert.plus[sid].clamp(0, 1).permute(1, 2, 0).numpy(),
            "minus": pert.minus[sid].clamp(0, 1).permute(1, 2, 0).numpy(),
            "difference": diff,
            "labels": labels,
            "unmodulated": pert.unmodulated.clamp(0, 1).permute(1, 2, 0).numpy(),
        }
        lam, t, layer = self.lambda_slider.value, self.timestep_slider.value, self.layer_dropdown.value
        titles = panel_titles(sid, float(lam))
        shown = dict(self.displayed, labels=colorize(labels))
        for key, ax in self.axes.items():
            arr = shown[key]
            if key not in self._artists:
                kw = {"cmap": HEATMAP_CMAP} if key == "difference" else {}
                self._artists[key] = ax.imshow(arr, **kw)
            else:
                self._artists[key].set_data(arr)
            ax.set_title(titles[key], fontsize=9)
        self._artists["difference"].set_clim(0, max(float(diff.max()), 1e-6))
        self.fig.suptitle(f"{self.image_name}  ·  t_m={t}  ·  {short_layer(layer)}", fontsize=10)
        self.fig.canvas.draw_idle()
        if self._static:
            self._show_static()
        loc = float((diff ** 2 * (lowres == sid)).sum() / max(float((diff ** 2).sum()), 1e-12))
        note = f"<b>{LAMBDA_ZERO_NOTE}</b> · " if lam == 0 else ""
        self.status.value = (f"{note}segment {sid}: locality {loc:.2f} · cache: {len(self._prepared)} image(s), "
                             f"{len(self._results)} setting(s) · UNet batches so far: {self.calls['perturb']}")

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

