"""Generate the study notebooks (00-06) with nbformat.

The committed .ipynb files are the product; this script is how they are kept
consistent (one parameters cell layout, one setup cell). Re-run after editing:

    .venv/bin/python notebooks/_build.py

Notebook rule of the house: cells hold parameters, calls and plots; all logic
lives in ``emerdiff`` (probes.py, viz.py, inspector.py) where it is tested.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Defaults: the project's reference model (128 px scenes, 16x16 query grid) on a laptop CPU.
# Paper settings for Stable Diffusion: resolution=512, K=25, blur_sigma=4.0
# (`make figures MODEL=... ` passes them for real models).
COMMON_PARAMETERS = '''\
# --- parameters (papermill overrides these; `make figures` passes model, device, size) ---
model = "reference"       # "reference" (ours, trained), "tiny" (random), a diffusers folder or hub id
device = "cpu"            # "cpu", "cuda", ...
dtype = None              # None: fp32 on CPU, fp16 on CUDA
images = ["scene:0", "scene:1", "voc_sample"]  # scene:N / voc_sample have GT; skimage names; paths
resolution = 128          # paper: 512
K = 8                     # paper: 25
num_inference_steps = 50  # paper: 50
modulation_timestep = 281 # paper: 281 (must lie on the schedule)
modulation_strength = 10.0
blur_sigma = 1.0          # paper-size images: 4.0
kmeans_n_init = 2
max_batch = 17            # 2K + 1: every modulated run and the reference in one batch
seeds = [0]
output_dir = None         # None: figures/lab/ of the checkout (ignored by git); `make figures` passes figures/
torch_threads = 0         # 0: torch default; 1 is much faster on a busy shared CPU
'''

SETUP = '''\
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from emerdiff import EmerDiff, EmerDiffConfig, load_pipeline
from emerdiff import probes, viz
from emerdiff.lab import default_figure_dir

if torch_threads:
    torch.set_num_threads(int(torch_threads))
viz.set_style()
sd = load_pipeline(model, device=device, dtype=dtype)
MODEL_LABEL = sd.source + (" (random weights)" if sd.source == "tiny" else "")
config = EmerDiffConfig(resolution=resolution, num_clusters=K, num_inference_steps=num_inference_steps,
                        modulation_timestep=modulation_timestep, modulation_strength=modulation_strength,
                        blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init, max_batch=max_batch,
                        seed=seeds[0], device=device)
ed = EmerDiff(sd, config)
items = probes.load_probe_images(images)
writer = viz.FigureWriter(output_dir or default_figure_dir(), MODEL_LABEL)
print(MODEL_LABEL, "| schedule:", ed.schedule.timesteps, "| query grid:", ed.query_grid())
'''


def notebook(title: str, intro: str, extra_parameters: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "emerdiff", "display_name": "Python (emerdiff)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells.append(new_markdown_cell(f"# {title}\n\n{intro}"))
    params = new_code_cell(COMMON_PARAMETERS + extra_parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells.append(params)
    nb.cells.append(new_code_cell(SETUP))
    for kind, src in cells:
        nb.cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    return nb


def md(s: str) -> tuple[str, str]:
    return ("md", s)


def code(s: str) -> tuple[str, str]:
    return ("code", s)


# --------------------------------------------------------------------------- 00
QUICKSTART = notebook(
    "00 · Quickstart",
    "Load a model, segment one image, compare EmerDiff with the low-res k-means and its upsampling baselines.",
    "",
    [
        code('''\
item = items[0]
seg = ed.segment(item.image, return_difference_maps=True, progress=False)
scores = {
    "emerdiff": probes.score_labels(seg.labels, item),
    "nearest": probes.score_labels(seg.nearest_labels, item),
    "bilinear": probes.score_labels(seg.bilinear_labels, item),
}
print({k: round(v["miou"], 2) for k, v in scores.items()}, "locality", seg.locality.round(2))'''),
        code('''\
fig = viz.segmentation_panels(item.image, seg, MODEL_LABEL, gt=item.label, title=f"EmerDiff quickstart: {item.name}")
writer.save(fig, "00_quickstart_segmentation")'''),
        code('''\
writer.sidecar("00_quickstart", {
    "image": item.name, "K": K, "resolution": resolution, "num_segments": seg.num_segments,
    "labels_shape": list(seg.labels.shape), "image_shape": list(item.image.shape[:2]),
    "miou": {k: v["miou"] for k, v in scores.items()},
    "boundary": {k: v["boundary"] for k, v in scores.items()},
    "locality": seg.locality.tolist(), "locality_mean": float(seg.locality.mean()),
    "timings": seg.timings, "unet_calls": seg.unet_calls,
})'''),
    ],
)

# --------------------------------------------------------------------------- 01
LAYER_PROBE = notebook(
    "01 · Layer probe: which UNet layers carry semantics?",
    "(a) The query vectors of **every** attention layer (self and cross, every block and resolution) "
    "are clustered with k-means and scored: per-image Hungarian mIoU where ground truth exists, "
    "otherwise the label-free *boundary alignment* (mean image gradient on segment boundaries / "
    "mean gradient overall; 1 = chance) and the cosine *silhouette* of the clustering "
    "(see `emerdiff.probes`).\n\n"
    "(b) Every candidate modulation layer, scored by *locality* (share of the difference-map "
    "energy inside the perturbed mask) and the final mIoU.",
    '''\
feature_layers = None     # None: every attention layer
modulation_kind = "cross" # candidate modulation layers: "cross", "self" or "all"
max_modulation_layers = 0 # 0: all candidates; n: the n candidates closest to the paper's (for quick runs)
''',
    [
        code('''\
feature_rows = probes.layer_probe(ed, items, layers=feature_layers, seeds=seeds)
print(len(feature_rows), "rows;", len({r["layer"] for r in feature_rows}), "layers")'''),
        code('''\
score = "miou" if any(i.has_gt for i in items) else "boundary"
fig = viz.probe_bars([r for r in feature_rows if np.isfinite(r[score])], "short", score, MODEL_LABEL,
                     f"(a) k-means on each layer's queries: {score}", hue="kind")
writer.save(fig, "01_layer_probe_features")
fig = viz.probe_heatmap(feature_rows, "short", "image", "boundary", MODEL_LABEL,
                        "(a) boundary alignment (label-free, 1 = chance)")
writer.save(fig, "01_layer_probe_features_boundary")'''),
        code('''\
candidates = probes.candidate_layers(ed, modulation_kind)
if max_modulation_layers:
    # keep the paper's layer and its neighbours in the 16x16 decoder block first
    candidates = sorted(candidates, key=lambda n: (not n.startswith("up_blocks.1"), n))[:max_modulation_layers]
    if config.modulation_layer not in candidates:
        candidates[-1] = config.modulation_layer
modulation_rows = probes.modulation_layer_probe(ed, items, layers=candidates, seeds=seeds)
for r in probes.summarize(modulation_rows, "short", ["locality", "miou"]):
    print(r)'''),
        code('''\
fig = viz.probe_heatmap(modulation_rows, "short", "image", "locality", MODEL_LABEL,
                        "(b) locality of the modulation readout per layer")
writer.save(fig, "01_layer_probe_modulation_locality")
fig = viz.probe_bars(modulation_rows, "short", "miou" if score == "miou" else "boundary", MODEL_LABEL,
                     "(b) final EmerDiff score per modulation layer")
writer.save(fig, "01_layer_probe_modulation_score")'''),
        code('''\
writer.sidecar("01_layer_probe", {
    "score": score, "num_layers": len({r["layer"] for r in feature_rows}),
    "feature_rows": feature_rows, "modulation_rows": modulation_rows,
    "feature_summary": probes.summarize(feature_rows, "layer", ["miou", "boundary", "silhouette"]),
    "modulation_summary": probes.summarize(modulation_rows, "layer", ["locality", "miou", "boundary"]),
    "best_feature_layer": probes.best(feature_rows, score, "layer"),
    "best_modulation_layer_locality": probes.best(modulation_rows, "locality", "layer"),
    "paper_query_layer": config.query_layer, "paper_modulation_layer": config.modulation_layer,
})'''),
    ],
)

# --------------------------------------------------------------------------- 02
TIMESTEP_PROBE = notebook(
    "02 · Timestep probe",
    "The feature timestep t_f (Step A), the modulation timestep t_m (Step C) and the number of "
    "denoising steps after the modulation, each swept; mean and spread over images and seeds.",
    '''\
feature_timesteps = None     # None: the whole schedule
modulation_timesteps = None  # None: the whole schedule (each costs one modulated denoising)
readout_steps = [1, 2, None] # None: full schedule with the stored inversion noise
''',
    [
        code('''\
feature_rows = probes.feature_timestep_sweep(ed, items, feature_timesteps, seeds)
modulation_rows = probes.modulation_timestep_sweep(ed, items, modulation_timesteps, seeds)
readout_rows = probes.readout_steps_sweep(ed, items, readout_steps, seeds)'''),
        code('''\
score = "miou" if any(i.has_gt for i in items) else "boundary"
fig = viz.sweep_lines(feature_rows, "feature_timestep", [score, "boundary", "silhouette"], MODEL_LABEL,
                      "Feature timestep t_f: low-res k-means quality")
writer.save(fig, "02_timestep_probe_feature")
fig = viz.sweep_lines(modulation_rows, "modulation_timestep", ["locality", score, "vanished"], MODEL_LABEL,
                      "Modulation timestep t_m")
writer.save(fig, "02_timestep_probe_modulation")
fig = viz.sweep_lines(readout_rows, "readout_steps", ["locality", score, "energy"], MODEL_LABEL,
                      "Denoising steps after the modulation")
writer.save(fig, "02_timestep_probe_readout_steps")'''),
        code('''\
writer.sidecar("02_timestep_probe", {
    "score": score, "feature_rows": feature_rows, "modulation_rows": modulation_rows, "readout_rows": readout_rows,
    "best_feature_timestep": probes.best(feature_rows, score, "feature_timestep"),
    "best_modulation_timestep_locality": probes.best(modulation_rows, "locality", "modulation_timestep"),
    "schedule": ed.schedule.timesteps,
})'''),
    ],
)

# --------------------------------------------------------------------------- 03
MAGNITUDE_PROBE = notebook(
    "03 · Magnitude probe: lambda and K",
    "lambda swept over both signs. *one-sided* rows compare I(lambda) with the unmodulated "
    "reconstruction I0 of the same batch; *pair* rows are EmerDiff's ||I- - I+|| at |lambda|. "
    "lambda = 0 changes nothing: locality is reported as 0 and the row flagged `degenerate`. "
    "Then K swept, against the nearest / bilinear upsampling of the same segments. Failure modes "
    "plotted: segments that vanish from the argmax, saturated pixels, energy spilling outside the mask.",
    '''\
strengths = [-100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0]
ks = [2, 4, 8]
''',
    [
        code('''\
lambda_rows = probes.lambda_sweep(ed, items, strengths, seeds)
k_rows = probes.k_sweep(ed, items, ks, seeds)'''),
        code('''\
score = "miou" if any(i.has_gt for i in items) else "boundary"
fig = viz.sweep_lines(lambda_rows, "lambda", ["locality", score, "energy"], MODEL_LABEL,
                      "Modulation strength lambda (both signs)", hue="mode")
writer.save(fig, "03_magnitude_probe_lambda")
k_long = [dict(K=r["K"], method=m, score=r[key], image=r["image"])
          for r in k_rows for m, key in (("EmerDiff", score), ("nearest", score + "_nearest"), ("bilinear", score + "_bilinear"))]
fig = viz.sweep_lines(k_long, "K", ["score"], MODEL_LABEL, f"Number of segments K ({score})", hue="method")
writer.save(fig, "03_magnitude_probe_k")
fig = viz.sweep_lines([r for r in lambda_rows if r["mode"] == "pair"] , "lambda", ["vanished", "saturated"],
                      MODEL_LABEL, "Failure modes vs lambda (pair readout)")
writer.save(fig, "03_magnitude_probe_failure_modes")'''),
        code('''\
writer.sidecar("03_magnitude_probe", {
    "score": score, "lambda_rows": lambda_rows, "k_rows": k_rows,
    "lambda_summary": probes.summarize(lambda_rows, ["lambda", "mode"], ["locality", "miou", "energy", "vanished"]),
    "k_summary": probes.summarize(k_rows, "K", ["miou", "miou_nearest", "miou_bilinear", "locality", "vanished"]),
})'''),
    ],
)

# --------------------------------------------------------------------------- 04
PAPER_FIGURES = notebook(
    "04 · Paper figures",
    "Fig. 1 teaser grid, Fig. 2 the key observation (one mask, I+, I-, difference map), "
    "Fig. 4 naive upsampling vs EmerDiff, a layer x timestep x lambda grid of difference maps, "
    "and failure cases.",
    '''\
key_mask = None               # None: the mask with the highest locality on the first image
grid_layers = None            # None: the three cross-attention layers of the 16x16 decoder block
grid_timesteps = None         # None: three timesteps spread over the schedule's lower half
grid_strengths = [-10.0, 10.0, 100.0]
vocabulary = "person, sky, grass, water, building, animal"  # open-vocabulary legend (first image)
''',
    [
        code('''\
segs = [ed.segment(i.image, return_difference_maps=True, progress=False) for i in items]
fig = viz.teaser_grid([i.image for i in items], segs, MODEL_LABEL, names=[i.name for i in items])
writer.save(fig, "fig1_teaser")'''),
        code('''\
item, seg = items[0], segs[0]
mask_id = int(np.argmax(seg.locality)) if key_mask is None else int(key_mask)
prepared = ed.prepare(item.image)
pert = probes.perturb_images(ed, prepared, mask_ids=[mask_id])
diff = pert.difference("pair")[0].numpy()
fig = viz.key_observation(item.image, prepared.segments.labels == mask_id, pert.plus[0], pert.minus[0], diff,
                          MODEL_LABEL, strength=config.modulation_strength)
writer.save(fig, "fig2_key_observation")'''),
        code('''\
scores = [{m: probes.score_labels(getattr(s, f), i)["miou"] for m, f in
           (("nearest", "nearest_labels"), ("bilinear", "bilinear_labels"), ("emerdiff", "labels"))}
          for i, s in zip(items, segs)]
fig = viz.upsampling_vs_emerdiff([i.image for i in items], segs, MODEL_LABEL, gts=[i.label for i in items],
                                 scores=scores, names=[i.name for i in items])
writer.save(fig, "fig4_upsampling_vs_emerdiff")'''),
        code('''\
layers = grid_layers or [l for l in probes.candidate_layers(ed, "cross") if l.startswith("up_blocks.1.")]
below = [t for t in ed.schedule.timesteps if t <= ed.schedule.timesteps[len(ed.schedule.timesteps) // 2]]
timesteps = grid_timesteps or sorted({below[0], below[len(below) // 2], below[-1]}, reverse=True)
grid_prep = ed.prepare(item.image, t_stop=max(timesteps))
maps = probes.difference_map_grid(ed, grid_prep, mask_id, layers, timesteps, grid_strengths)
# one row per layer, one column per (timestep, lambda): wide and short rather than 9 rows tall
grid = [[maps[(l, t, float(s))] for t in timesteps for s in grid_strengths] for l in layers]
columns = [f"t={t}\\nlambda={s:g}" for t in timesteps for s in grid_strengths]
fig = viz.heatmap_grid(grid, [probes.short_layer(l) for l in layers], columns, MODEL_LABEL,
                       f"Difference maps of mask {mask_id}: layer (rows) x timestep x lambda (columns)", cell=1.4)
writer.save(fig, "fig_ablation_layer_timestep_lambda")'''),
        code('''\
entries = probes.failure_entries(seg, item.image, n=2)
fig = viz.failure_cases(entries, MODEL_LABEL)
writer.save(fig, "fig_failure_cases")'''),
        md("Open vocabulary: each EmerDiff mask named by the diffusion model's own cross-attention "
           "(DAAM-style, no extra model), with its legend. `emerdiff.openvocab.CLIPMaskLabeller` does the same "
           "with MaskCLIP features. **Caveat:** on the small models (reference, tiny) this labeller is near "
           "chance (reference v1, 100 held-out scenes: 2.2 mIoU, `docs/reference/heldout_results.md`); "
           "the figure says so, and its names are an illustration of the interface, not a result."),
        code('''\
from emerdiff.openvocab import CrossAttentionLabeller, legend_figure

labeller = CrossAttentionLabeller(sd, resolution=config.resolution, seed=config.seed)
named = labeller.label(item.image, seg, vocabulary)
# small (<= 128 px) models: the labeller is near chance, so the figure must not read as a result
caveat = ("" if resolution >= 512 else "Caveat: on this small model the cross-attention labeller is near chance "
          "(reference v1: 2.2 mIoU on 100 held-out scenes); these names illustrate the interface, they are not a result.")
fig = legend_figure(item.image, named, title=f"open-vocabulary labels (cross-attention) · {MODEL_LABEL}",
                    caveat=caveat)
writer.save(fig, "fig_open_vocabulary")'''),
        code('''\
writer.sidecar("04_paper_figures", {
    "open_vocabulary": {"vocabulary": named.vocabulary, "mask_classes": named.mask_classes.tolist()},
    "images": [i.name for i in items], "key_mask": mask_id, "key_locality": float(seg.locality[mask_id]),
    "key_difference_max": float(diff.max()), "miou": scores,
    "grid": {"layers": layers, "timesteps": timesteps, "strengths": grid_strengths},
    "failure_masks": [e["mask_id"] for e in entries],
})'''),
    ],
)

# --------------------------------------------------------------------------- 05
INSPECTOR = notebook(
    "05 · Perturbation inspector",
    "Pick an image, click a segment (or choose it from the list), move the lambda / timestep sliders "
    "and the layer dropdown; I+, I-, the difference map and the full-resolution labels update. The "
    "inversion is cached per image up to the largest timestep of the slider, so a slider move costs "
    "only the modulated steps. Errors in callbacks appear in the log below the figure.",
    '''\
mpl_backend = "widget"   # ipympl; "agg" for headless runs
slider_timesteps = None  # None: every schedule timestep up to modulation_timestep
''',
    [
        code('''\
import matplotlib
if mpl_backend == "widget":
    get_ipython().run_line_magic("matplotlib", "widget")
else:
    matplotlib.use(mpl_backend)
from emerdiff.inspector import Inspector

inspector = Inspector(ed, {i.name: i.image for i in items}, timesteps=slider_timesteps)
inspector.widget'''),
        md("Programmatic use (what the tests do): set widget values, read `inspector.displayed`; the cell "
           "then puts the starting values back, so the widget above still shows its starting state."),
        code('''\
start = (inspector.lambda_slider.value, inspector.segment_select.value)
before = {k: v.copy() for k, v in inspector.displayed.items()}
inspector.lambda_slider.value = -start[0]
inspector.segment_select.value = (start[1] + 1) % inspector.num_segments
changed = {k: bool(not np.array_equal(before[k], v)) for k, v in inspector.displayed.items() if k in before}
# back to the starting state (cached: no recompute), so the widget above shows what it started with
inspector.lambda_slider.value, inspector.segment_select.value = start
restored = all(np.array_equal(before[k], v) for k, v in inspector.displayed.items())
print(changed, "restored:", restored, inspector.errors)
writer.save(inspector.fig, "05_inspector")
writer.sidecar("05_inspector", {"changed": changed, "restored": restored, "errors": inspector.errors,
                                "displayed": {k: list(v.shape) for k, v in inspector.displayed.items()},
                                "cache": inspector.cache_info()})'''),
    ],
)

# --------------------------------------------------------------------------- 06
DIAGNOSIS = notebook(
    "06 · Diagnosis: where does the readout lose locality, and where do its labels move?",
    "EmerDiff beats upsampling only if a perturbation stays inside its mask all the way to the "
    "pixels. (a) `diagnosis.locality_by_stage` follows the perturbations through the pipeline: "
    "share of the change inside the mask right after the modulated UNet call (its x_0 prediction), "
    "after the remaining denoising steps (latent), after decoding (EmerDiff's maps), and for the "
    "VAE decoder alone fed the latent change cut to the mask. (b) `diagnosis.label_moves`: pixels "
    "where EmerDiff's labels differ from nearest upsampling of the same segments, in a band around "
    "the low-res boundaries and in the interior, and which of the two is right there (each "
    "method's segments mapped to their majority ground-truth class). (c) Readout settings "
    "compared the same way. The default images are held-out scenes 100+, disjoint from the 100 "
    "test scenes of `python -m emerdiff.reference.heldout`: settings are explored here, never on "
    "the test scenes.",
    '''\
images = ["scene:100", "scene:101", "scene:102", "scene:103", "scene:104", "scene:105"]
example_masks = 3         # masks shown per stage in the example figure
settings = None           # list of config changes, e.g. [{}, {"readout_steps": 1}]; None: diagnosis.default_settings
''',
    [
        code('''\
from emerdiff import diagnosis

rows = diagnosis.diagnose(ed, items)
stage_rows = [dict(image=r["image"], stage=s, locality=r[s]) for r in rows for s in ("chance", *diagnosis.STAGES)]
for s in ("chance", *diagnosis.STAGES):
    print(f"{s:16s} locality {np.mean([r[s] for r in rows]):.3f}")'''),
        code('''\
fig = viz.probe_bars(stage_rows, "stage", "locality", MODEL_LABEL,
                     "(a) share of the change inside the perturbed mask, by stage")
writer.save(fig, "06_diagnosis_locality_by_stage")
example = diagnosis.locality_by_stage(ed, ed.prepare(items[0].image))
n = min(example_masks, len(example["per_mask"]["decoded"]))
fig = viz.heatmap_grid([[example["maps"][s][i].numpy() for s in diagnosis.STAGES] for i in range(n)],
                       [f"mask {i}" for i in range(n)], list(diagnosis.STAGES), MODEL_LABEL,
                       f"(a) one image ({items[0].name}): the change at each stage")
writer.save(fig, "06_diagnosis_stage_maps")'''),
        md("(b) Where the labels move. *fixed*: pixels EmerDiff gets right and nearest upsampling wrong; "
           "*broken*: the reverse (shares of the region's pixels). Needs images with ground truth."),
        code('''\
gt_rows = [r for r in rows if "fixed_band" in r]
move_rows = [dict(image=r["image"], region=g, outcome=o, share=r[f"{o}_{g}"])
             for r in gt_rows for g in ("band", "interior") for o in ("moved", "fixed", "broken")]
if gt_rows:
    fig = viz.probe_bars(move_rows, "region", "share", MODEL_LABEL,
                         "(b) EmerDiff vs nearest upsampling of the same segments", hue="outcome", rotate=False)
    writer.save(fig, "06_diagnosis_label_moves")
    for key in ("band_share", "acc_nearest_band", "acc_emerdiff_band", "acc_nearest_interior", "acc_emerdiff_interior"):
        print(f"{key:24s} {np.mean([r[key] for r in gt_rows]):.3f}")'''),
        code('''\
sweep_rows = diagnosis.settings_sweep(ed, items, settings or diagnosis.default_settings(ed))
acc_rows = [dict(image=r["image"], setting=r["setting"], method=m, accuracy=r[k])
            for r in sweep_rows if "acc_nearest_all" in r
            for m, k in (("EmerDiff", "acc_emerdiff_all"), ("nearest", "acc_nearest_all"))]
fig = viz.probe_bars(sweep_rows, "setting", "locality", MODEL_LABEL, "(c) locality per readout setting")
writer.save(fig, "06_diagnosis_settings_locality")
if acc_rows:
    fig = viz.probe_bars(acc_rows, "setting", "accuracy", MODEL_LABEL,
                         "(c) pixel accuracy per readout setting (majority mapping)", hue="method")
    fig.axes[0].set_ylim(max(0.0, min(r["accuracy"] for r in acc_rows) - 0.05), 1.0)  # the differences are small
    writer.save(fig, "06_diagnosis_settings_accuracy")
for r in probes.summarize(sweep_rows, "setting", ["locality", "acc_emerdiff_all", "acc_nearest_all"]):
    print(r)'''),
        code('''\
writer.sidecar("06_diagnosis", {
    "rows": rows, "sweep_rows": sweep_rows, "stages": list(diagnosis.STAGES),
    "stage_summary": {s: float(np.mean([r[s] for r in rows])) for s in ("chance", *diagnosis.STAGES)},
    "settings_summary": probes.summarize(sweep_rows, "setting", ["locality", "acc_emerdiff_all", "acc_nearest_all"]),
})'''),
    ],
)

NOTEBOOKS = {
    "00_quickstart": QUICKSTART,
    "01_layer_probe": LAYER_PROBE,
    "02_timestep_probe": TIMESTEP_PROBE,
    "03_magnitude_probe": MAGNITUDE_PROBE,
    "04_paper_figures": PAPER_FIGURES,
    "05_inspector": INSPECTOR,
    "06_diagnosis": DIAGNOSIS,
}


def main() -> None:
    for name, nb in NOTEBOOKS.items():
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating does not churn the diff
            cell.id = f"{name[:2]}-{i:02d}"
        nbformat.validate(nb)
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(nb) + "\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print("wrote", path)


if __name__ == "__main__":
    main()
