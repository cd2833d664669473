# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 07 · Evaluation: two settings compared on the same scenes, with intervals
#
# Two `emerdiff evaluate` runs on the same held-out scenes, then `emerdiff compare` of the two:
# every protocol x method mIoU of each run and the paired difference A - B, each with a 95 %
# bootstrap interval over the scenes. Both protocols that published numbers use are here, from
# the same cached records: *per-image Hungarian* (each image's segments matched to its own
# classes, as DiffSeg and DiffCut report) and *dataset Hungarian* (k-means of all segments'
# embeddings, one matching for the dataset, as EmerDiff reports), plus the paper's *concept*
# protocol (nearest class concept, no matching). Per-class IoU shows which classes a difference
# comes from. The default scenes are held-out scenes 100+ (validation), disjoint from the 100
# test scenes of `python -m training.heldout`, whose table lives in docs/reference.

# %% tags=["parameters"]
# --- parameters (papermill overrides these; `make figures` passes model, device, output_dir) ---
model = "reference"       # "reference" (ours, trained), "tiny" (random), a diffusers folder or hub id
device = "cpu"            # "cpu", "cuda", ...
dtype = None              # None: fp32 on CPU, fp16 on CUDA
images = ["scene:100"]    # the setup's probe image; the evaluation reads the scenes below
first_scene = 100         # held-out scenes first_scene .. first_scene + num_scenes - 1 of the model's world
num_scenes = 8            # (0-99 are the test scenes); reference model on a CPU: ~25 s a scene and setting
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
# The two settings compared: a name and EmerDiffConfig changes on top of the sizes above.
setting_a = {"name": "k-means + EmerDiff", "changes": {}}
setting_b = {"name": "DiffSeg + EmerDiff", "changes": {"lowres": "diffseg"}}
# DiffSeg's merge threshold tau; None: the model's preset, 0.1 on the reference model (its flat
# self-attention merges into one segment at the published 1.1; docs/METHOD.md), else DiffSeg's 1.1
diffseg_kl_threshold = None
bootstrap = 1000          # resamples of the scenes for every interval (paired: A and B resampled alike)
runs_dir = None           # None: a temporary folder, removed at the end; a path keeps the runs (and their
#                           caches: a rerun with the same settings segments nothing) for `emerdiff compare`
examples = 2              # scenes drawn with both runs' labels
output_dir = None         # None: figures/lab/ of the checkout (ignored by git); `make figures` passes figures/
torch_threads = None      # None: 1 below 4 cores, else the cores free by load (as the CLI); 0: torch's own

# %%
from emerdiff.notebook import lab

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, num_clusters=num_clusters,
    num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
    modulation_strength=modulation_strength, blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init,
    max_batch=max_batch, diffseg_kl_threshold=diffseg_kl_threshold, seeds=seeds, output_dir=output_dir,
    torch_threads=torch_threads)

# %% [markdown]
# ## What is compared, and why
#
# By default: the source of the low-resolution segments (Step A), with everything after it
# fixed. A is the paper's k-means of the cross-attention queries; B is DiffSeg's segments
# (self-attention maps merged by KL distance, its own number of segments per image), read out
# at pixel level by the same EmerDiff modulation (`EmerDiffConfig(lowres="diffseg")`). So the
# `emerdiff` row of A - B isolates Step A; the `nearest` / `bilinear` rows are each run's
# segments merely upsampled (what the readout adds over them is `emerdiff` - `nearest` within a
# run); `diffseg` (B only) is DiffSeg alone, its proposals upsampled and argmaxed. The two
# matchings can rank these differently: DiffSeg picks K per image, which per-image Hungarian
# rewards (every segment matched to a class of its own image) and dataset Hungarian does not
# (one clustering of all segments), which is why the published numbers of DiffSeg/DiffCut and
# EmerDiff are not comparable. Any two settings compare the same way: `setting_b =
# {"name": "t_m 281", "changes": {"modulation_timestep": 281}}` asks whether the paper's
# modulation timestep would beat the reference model's 81 on these scenes.
#
# Each run is the evaluation engine of the `evaluate` command (`emerdiff.evaluation.runner.run_evaluation`,
# the config object given outright): it caches one record per scene (resumable, self-verifying), then scores every
# protocol from the records. The same runs from a shell: `emerdiff evaluate --data DATA --out A`
# (and `--set lowres=diffseg` for B), then `emerdiff compare A B`.

# %%
import tempfile
from pathlib import Path

from emerdiff.assets import model_world
from emerdiff.evaluation import compare, records, runner
from emerdiff.evaluation.datasets import write_heldout_folder

tau = config.diffseg_kl_threshold  # the parameter, or the model's preset
scratch = tempfile.TemporaryDirectory(prefix="emerdiff-07-") if runs_dir is None else None
runs = Path(runs_dir or scratch.name)
data = write_heldout_folder(runs / "data", n=num_scenes, start=first_scene, world=model_world(model))
settings = {"A": setting_a, "B": setting_b}
configs = {side: config.replace(**s["changes"]) for side, s in settings.items()}
results = {}
for side, cfg in configs.items():  # the whole config given outright: each run evaluates exactly it
    results[side] = runner.run_evaluation(data, model, cfg, runs / side, n_boot=bootstrap, device=device,
                                          dtype=dtype, quiet=True)
    print(f"{side} = {settings[side]['name']}: {runs / side}")

# %% [markdown]
# ## Side by side: A, B and A - B (95 % paired bootstrap intervals over scenes)
#
# `*` marks a difference whose interval excludes 0. With a handful of scenes the intervals are
# wide: a difference without `*` is not evidence of no difference, only of too few scenes.

# %%
comparison = compare.compare_runs(runs / "A", runs / "B", n_boot=bootstrap)
print(f"A = {setting_a['name']}, B = {setting_b['name']}")
print(compare.comparison_table(comparison))

# %% [markdown]
# Within each run: what the EmerDiff readout adds over the same segments upsampled (nearest,
# bilinear) and, where the run has it, over DiffSeg alone. Paired intervals from each run's own
# bootstrap (`results.json`, "intervals"; `emerdiff-nearest` = EmerDiff's mIoU minus nearest's).

# %%
protocols = ["per_image_hungarian", "dataset_hungarian", "concept"]
within = compare.within_run_rows({side: results[side] for side in configs}, protocols)
print(compare.within_run_table({side: results[side] for side in configs}, protocols))

# %%
import matplotlib.pyplot as plt
import numpy as np

from emerdiff import viz

fig = viz.comparison_figure(comparison, MODEL_LABEL, names=(setting_a["name"], setting_b["name"]),
                            protocols=protocols, note=f"scenes {first_scene}-{first_scene + num_scenes - 1}")
writer.save(fig, "07_evaluation_miou")
plt.show()

# %% [markdown]
# ## Per-class IoU under both matchings
#
# Which classes a difference comes from. Blank: the class is absent from both the ground truth
# and the prediction of those scenes. Under per-image Hungarian a method that finds fewer
# segments than an image has classes leaves some classes unmatched (IoU 0 there); under
# dataset Hungarian a class can lose its only cluster to a bigger one.

# %%
class_names = results["A"]["config"]["class_names"]
per_class = {}  # protocol -> {"A · emerdiff": [IoU of each class, None where undefined], ...}
for side in configs:
    for res in results[side]["protocols"]:
        for method, scores in res["methods"].items():
            per_class.setdefault(res["protocol"], {})[f"{side} · {method}"] = list(scores["per_class_iou"].values())
fig, axes = plt.subplots(2, 1, figsize=(2.2 + 0.6 * len(class_names), 8.0), layout="constrained")
for ax, protocol in zip(axes, protocols[:2]):
    table = np.array([[np.nan if v is None else v for v in row] for row in per_class[protocol].values()], float)
    im = ax.imshow(np.ma.masked_invalid(table), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (r, c), v in np.ndenumerate(table):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), list(per_class[protocol]))
    ax.set_title(f"per-class IoU (%), {protocol.replace('_', ' ')}")
fig.colorbar(im, ax=axes, shrink=0.6, label="IoU (%)")
fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))  # room for the footer and the title
fig.suptitle(f"A = {setting_a['name']}, B = {setting_b['name']}: {comparison['shared_images']} scenes")
viz.stamp_model(fig, MODEL_LABEL, "blank: class absent from ground truth and prediction")
writer.save(fig, "07_evaluation_per_class")
plt.show()

# %% [markdown]
# ## What the two runs segmented
#
# The first scenes with each run's EmerDiff labels and B's DiffSeg alone (mask ids, colours
# arbitrary per map), read back from the runs' per-scene records.

# %%
from emerdiff.evaluation.datasets import folder_dataset

scenes = folder_dataset(data)
shown = min(examples, len(scenes))
fig, axes = plt.subplots(max(shown, 1), 5, figsize=(10, 2.1 * max(shown, 1)), squeeze=False)
for i in range(shown):
    sample = scenes[i]
    image = sample.load_image()
    maps = {}
    for side in configs:  # the label maps each run stored beside its record
        with np.load(records.record_path(runs / side, sample.image_id)) as z:
            maps[side] = {k: z[k] for k in z.files if k.startswith("map_")}
    panels = [("image", image), ("ground truth", viz.colorize(maps["A"]["map_gt"])),
              (f"A: {setting_a['name']}", viz.overlay(image, maps["A"]["map_emerdiff"])),
              (f"B: {setting_b['name']}", viz.overlay(image, maps["B"]["map_emerdiff"]))]
    if "map_diffseg" in maps["B"]:
        panels.append(("B: DiffSeg alone", viz.overlay(image, maps["B"]["map_diffseg"])))
    for ax, (title, panel) in zip(axes[i], panels):
        viz.show(ax, panel, title if i == 0 else None)
    axes[i, 0].set_ylabel(sample.image_id, fontsize=7)
    for ax in axes[i, len(panels):]:
        ax.axis("off")
viz.stamp_model(fig, MODEL_LABEL)
fig.tight_layout(rect=(0, 0.03, 1, 1))
writer.save(fig, "07_evaluation_examples")
plt.show()

# %%
own_rows = {side: [{k: r[k] for k in ("protocol", "method", "miou", "miou_lo", "miou_hi")}
                   for r in results[side]["rows"]] for side in configs}
writer.sidecar("07_evaluation", {
    "scenes": {"first": first_scene, "num": num_scenes, "world": model_world(model)},
    "settings": {side: {"name": settings[side]["name"], "changes": settings[side]["changes"]} for side in configs},
    "diffseg_kl_threshold": tau, "bootstrap": comparison["bootstrap"], "shared_images": comparison["shared_images"],
    "only_a": comparison["only_a"], "only_b": comparison["only_b"],
    "comparison": comparison["rows"], "runs": own_rows, "within_run": within,
    "segmentation_config": {side: results[side]["config"]["segmentation_config"] for side in configs},
})
if scratch is not None:
    scratch.cleanup()
