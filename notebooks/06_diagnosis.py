# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 06 · Diagnosis: where does the readout lose locality, and where do its labels move?
#
# EmerDiff beats upsampling only if a perturbation stays inside its mask all the way to the
# pixels. (a) `diagnosis.locality_by_stage` follows the perturbations through the pipeline: share
# of the change inside the mask right after the modulated UNet call (its x_0 prediction), after
# the remaining denoising steps (latent), after decoding (EmerDiff's maps), and for the VAE
# decoder alone fed the latent change cut to the mask. (b) `diagnosis.label_moves`: pixels where
# EmerDiff's labels differ from nearest upsampling of the same segments, in a band around the
# low-res boundaries and in the interior, and which of the two is right there (each method's
# segments mapped to their majority ground-truth class). (c) Readout settings compared the same
# way. The default images are held-out scenes 100+, disjoint from the 100 test scenes of
# `python -m training.heldout`: settings are explored here, never on the test scenes.

# %% tags=["parameters"]
# --- parameters (papermill overrides these; `make figures` passes model, device, output_dir) ---
model = "reference"       # "reference" (ours, trained), "tiny" (random), a diffusers folder or hub id
device = "cpu"            # "cpu", "cuda", ...
dtype = None              # None: fp32 on CPU, fp16 on CUDA
images = ["scene:100", "scene:101", "voc_sample"]  # scene:N (validation, 100+) / voc_sample have GT; skimage; paths
# Settings left None take the model's preset (emerdiff.config.PRESETS, as EmerDiffConfig.for_model and
# `emerdiff segment`): the reference model 128 px, 50 steps, t_m 81, num_clusters 8, blur 1, batch 17;
# Stable Diffusion (the paper) 512 px, 50 steps, t_m 281, num_clusters 25, blur 4, batch 16.
resolution = None
num_clusters = None
num_inference_steps = None
modulation_timestep = None  # must lie on the schedule
modulation_strength = 10.0
blur_sigma = None
kmeans_n_init = 2
max_batch = None          # UNet batch of the modulated denoising (2K + 1: every run and the reference at once)
seeds = [0]
output_dir = None         # None: figures/lab/ of the checkout (ignored by git); `make figures` passes figures/
torch_threads = None      # None: 1 below 4 cores, else the cores free by load (as the CLI); 0: torch's own
images = ["scene:100", "scene:101", "scene:102", "scene:103", "scene:104", "scene:105"]
example_masks = 3         # masks shown per stage in the example figure
settings = None           # list of config changes, e.g. [{}, {"readout_steps": 1}]; None: diagnosis.default_settings
deletion_fill = "mean"    # what replaces the deleted segment: "mean", "blur", "reference" (a null control)

# %%
import numpy as np

from emerdiff import viz
from emerdiff.evaluation import metrics
from emerdiff.notebook import lab

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, num_clusters=num_clusters,
    num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
    modulation_strength=modulation_strength, blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init,
    max_batch=max_batch, seeds=seeds, output_dir=output_dir, torch_threads=torch_threads)

# %%
from emerdiff.studies import diagnosis

rows = diagnosis.diagnose(ed, items)
stage_rows = [dict(image=r["image"], stage=s, locality=r[s]) for r in rows for s in ("chance", *diagnosis.STAGES)]
for s in ("chance", *diagnosis.STAGES):
    print(f"{s:16s} locality {np.mean([r[s] for r in rows]):.3f}")

# %%
fig = viz.probe_bars(stage_rows, "stage", "locality", MODEL_LABEL,
                     "(a) share of the change inside the perturbed mask, by stage")
writer.save(fig, "06_diagnosis_locality_by_stage")
example = diagnosis.locality_by_stage(ed, ed.prepare(items[0].image))
n = min(example_masks, len(example["per_mask"]["decoded"]))
# one colour scale per stage (column): the stages measure the change in different spaces (latent, pixels)
fig = viz.heatmap_grid([[example["maps"][s][i].numpy() for s in diagnosis.STAGES] for i in range(n)],
                       [f"mask {i}" for i in range(n)], [s.replace("_", " ") for s in diagnosis.STAGES], MODEL_LABEL,
                       f"(a) one image ({items[0].name}): the change at each stage", scale="column",
                       colorbar_label="size of the change")
writer.save(fig, "06_diagnosis_stage_maps")

# %% [markdown]
# (b) Where the labels move. *fixed*: pixels EmerDiff gets right and nearest upsampling wrong;
# *broken*: the reverse (shares of the region's pixels). Needs images with ground truth.

# %%
gt_rows = [r for r in rows if "fixed_band" in r]
move_rows = [dict(image=r["image"], region=g, outcome=o, share=r[f"{o}_{g}"])
             for r in gt_rows for g in ("band", "interior") for o in ("moved", "fixed", "broken")]
if gt_rows:
    fig = viz.probe_bars(move_rows, "region", "share", MODEL_LABEL,
                         "(b) EmerDiff vs nearest upsampling of the same segments", hue="outcome", rotate=False)
    writer.save(fig, "06_diagnosis_label_moves")
    for key in ("band_share", "acc_nearest_band", "acc_emerdiff_band", "acc_nearest_interior", "acc_emerdiff_interior"):
        print(f"{key:24s} {np.mean([r[key] for r in gt_rows]):.3f}")

# %%
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
for r in metrics.summarize(sweep_rows, "setting", ["locality", "acc_emerdiff_all", "acc_nearest_all"]):
    print(r)

# %% [markdown]
# (d) The deletion test (`faithfulness.deletion_test`, docs/METHOD.md "Faithfulness measures"): on
# the first image, the segment under the image centre has its pixels replaced (`deletion_fill`),
# the edited image is prepared again with the same low-res segments, and the segment and a control
# (the largest other segment, whose content stayed) are perturbed in both. `ratio` = response
# after / before inside the segment's own area: near 0 the response vanished with the content
# (the map is about the thing), near 1 it does not depend on what is there (chance: the
# perturbation acts on the place). `control_ratio` should stay near 1; the test speaks only where
# `ratio` is well below it. Rows of the figure: before / after; columns: segment / control.

# %%
from emerdiff.method import measures as faithfulness

first = ed.segment(items[0].image, progress=False)
grid_h, grid_w = first.lowres_labels.shape
deleted_mask = int(first.lowres_labels[grid_h // 2, grid_w // 2])
deletion = faithfulness.deletion_test(ed, items[0].image, first, deleted_mask, fill=deletion_fill)
print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in deletion.items() if not k.startswith("maps_")})
fig = viz.heatmap_grid([list(deletion["maps_before"]), list(deletion["maps_after"])],
                       ["before", f"after ({deletion_fill})"], [f"segment {deletion['mask']}", f"control {deletion['control']}"],
                       MODEL_LABEL, f"(d) deletion test on {items[0].name}: maps before / after deleting the segment",
                       scale="shared")
writer.save(fig, "06_diagnosis_deletion")

# %%
writer.sidecar("06_diagnosis", {
    "rows": rows, "sweep_rows": sweep_rows, "stages": list(diagnosis.STAGES),
    "stage_summary": {s: float(np.mean([r[s] for r in rows])) for s in ("chance", *diagnosis.STAGES)},
    "settings_summary": metrics.summarize(sweep_rows, "setting", ["locality", "acc_emerdiff_all", "acc_nearest_all"]),
    "deletion": {k: v for k, v in deletion.items() if not k.startswith("maps_")},
})
