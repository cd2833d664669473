# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 04 · Paper figures
#
# Fig. 1 teaser grid, Fig. 2 the key observation (one mask, I+, I-, difference map), Fig. 4 naive
# upsampling vs EmerDiff, a layer x timestep x lambda grid of difference maps, and failure cases.

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
key_mask = None               # None: the mask with the highest locality on the first image
grid_layers = None            # None: the three cross-attention layers of the 16x16 decoder block
grid_timesteps = None         # None: three timesteps spread over the schedule's lower half
grid_strengths = [-10.0, 10.0, 100.0]
# open-vocabulary legend (first image); None: a model with a closed vocabulary (the reference model: its 12
# scene classes) names its own classes on a scene, any other model "person, sky, grass, water, building, animal"
vocabulary = None
# draw fig_open_vocabulary? None: unless the model's vocabulary is closed and it names its own classes on the
# scene no better than chance (naming every pixel the scene's commonest class); True: always; False: never
open_vocabulary = None

# %%
import numpy as np

from emerdiff import viz
from emerdiff.evaluation import metrics
from emerdiff.notebook import lab
from emerdiff.studies import probes

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, num_clusters=num_clusters,
    num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
    modulation_strength=modulation_strength, blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init,
    max_batch=max_batch, seeds=seeds, output_dir=output_dir, torch_threads=torch_threads)

# %%
segs = [ed.segment(i.image, return_difference_maps=True, progress=False) for i in items]
fig = viz.teaser_grid([i.image for i in items], segs, MODEL_LABEL, names=[i.name for i in items])
writer.save(fig, "fig1_teaser")

# %%
item, seg = items[0], segs[0]
mask_id = int(np.argmax(seg.locality)) if key_mask is None else int(key_mask)
prepared = ed.prepare(item.image)
pert = probes.perturb_images(ed, prepared, mask_ids=[mask_id])
diff = pert.difference("pair")[0].numpy()
fig = viz.key_observation(item.image, prepared.segments.labels == mask_id, pert.plus[0], pert.minus[0], diff,
                          MODEL_LABEL, strength=config.modulation_strength)
writer.save(fig, "fig2_key_observation")

# %%
scores = [{m: metrics.score_labels(getattr(s, f), i)["miou"] for m, f in
           (("nearest", "nearest_labels"), ("bilinear", "bilinear_labels"), ("emerdiff", "labels"))}
          for i, s in zip(items, segs)]
fig = viz.upsampling_vs_emerdiff([i.image for i in items], segs, MODEL_LABEL, gts=[i.label for i in items],
                                 scores=scores, names=[i.name for i in items])
writer.save(fig, "fig4_upsampling_vs_emerdiff")

# %%
layers = grid_layers or [l for l in probes.candidate_layers(ed, "cross") if l.startswith("up_blocks.1.")]
below = [t for t in ed.schedule.timesteps if t <= ed.schedule.timesteps[len(ed.schedule.timesteps) // 2]]
timesteps = grid_timesteps or sorted({below[0], below[len(below) // 2], below[-1]}, reverse=True)
grid_prep = ed.prepare(item.image, t_stop=max(timesteps))
maps = probes.difference_map_grid(ed, grid_prep, mask_id, layers, timesteps, grid_strengths)
# one row per lambda with one colour scale (its bar at the row's end), so the rows' magnitudes can be
# read; one column per (layer, timestep): wide and short rather than 9 rows tall
grid = [[maps[(l, t, float(s))] for l in layers for t in timesteps] for s in grid_strengths]
columns = [f"{probes.short_layer(l)}\nt_m={t}" for l in layers for t in timesteps]
fig = viz.heatmap_grid(grid, [f"lambda = {s:g}" for s in grid_strengths], columns, MODEL_LABEL,
                       f"Difference maps of mask {mask_id}: lambda (rows) x layer and timestep t_m (columns)",
                       scale="row", cell=1.4)
writer.save(fig, "fig_ablation_layer_timestep_lambda")

# %%
# each row its own case: the least local mask of every image, then the first image's next cases
# (second least local, smallest mask) until there are three rows
entries = []
for it, s in zip(items, segs):
    worst = probes.failure_entries(s, it.image, n=1)[0]
    entries.append({**worst, "caption": f"{it.name}: {worst['caption']}"})
for extra in probes.failure_entries(seg, item.image, n=2)[1:]:
    if len(entries) < 3:
        entries.append({**extra, "caption": f"{item.name}: {extra['caption']}"})
fig = viz.failure_cases(entries, MODEL_LABEL)
writer.save(fig, "fig_failure_cases")

# %% [markdown]
# Open vocabulary: each EmerDiff mask named by the diffusion model's own cross-attention
# (DAAM-style, no extra model), with its legend. `emerdiff.method.vocabulary.CLIPMaskLabeller` does the
# same with MaskCLIP features. The reference model knows only the words of its 12 scene classes, so
# by default it names a validation scene (100+) with those classes and is scored against the scene's
# ground truth: the share of pixels named right, against chance (every pixel named the scene's
# commonest class). Where it does no better than chance, the figure is not drawn (the sidecar keeps
# both numbers): on the shipped reference model its cross-attention does not carry the class names.
# The warnings of `emerdiff.method.vocabulary.vocabulary_warnings` (words outside what the model
# knows, masks whose best class is within noise of the next) are the figure's caveat.

# %%
from emerdiff.assets.scenes import CLASSES
from emerdiff.method.vocabulary import CrossAttentionLabeller, known_vocabulary, vocabulary_warnings

known = known_vocabulary(sd)
own_classes = known is not None and vocabulary is None
words = vocabulary or (list(CLASSES) if own_classes else "person, sky, grass, water, building, animal")
# the scene classes name a scene's ground-truth ids in order: the figure can show and score them
vocab_item, vocab_seg = next(((i, s) for i, s in zip(items, segs) if own_classes and i.name.startswith("scene")),
                             (item, seg))
labeller = CrossAttentionLabeller(sd, resolution=config.resolution, seed=config.seed)
named = labeller.label(vocab_item.image, vocab_seg, words)
gt = vocab_item.label if own_classes and vocab_item.label is not None else None
correct = chance = None
if gt is not None:
    valid = gt != vocab_item.ignore_index
    correct = float((named.class_map == gt)[valid].mean())
    chance = float(np.bincount(gt[valid]).max() / valid.sum())
warnings = vocabulary_warnings(named, known)
draw = open_vocabulary if open_vocabulary is not None else (known is None or correct is None or correct > chance)
print(f"open vocabulary on {vocab_item.name}: {named.vocabulary}",
      "" if correct is None else f"pixels named right {correct:.1%} (chance {chance:.1%})",
      "-> drawn" if draw else "-> not drawn: no better than chance", *warnings, sep="\n")
if draw:
    title = (f"open-vocabulary labels (cross-attention) of {vocab_item.name} · {MODEL_LABEL}"
             + (f" · {correct:.0%} of the pixels named right (chance {chance:.0%})" if correct is not None else ""))
    caveat = ("Caveat: " + "; ".join(warnings)) if warnings else ""
    fig = viz.legend_figure(vocab_item.image, named, title=title, caveat=caveat, gt=gt)
    writer.save(fig, "fig_open_vocabulary")

# %%
writer.sidecar("04_paper_figures", {
    "open_vocabulary": {"image": vocab_item.name, "vocabulary": named.vocabulary,
                        "mask_classes": named.mask_classes.tolist(), "pixels_named_right": correct,
                        "chance": chance, "drawn": bool(draw), "warnings": warnings},
    "images": [i.name for i in items], "key_mask": mask_id, "key_locality": float(seg.locality[mask_id]),
    "key_difference_max": float(diff.max()), "miou": scores,
    "grid": {"layers": layers, "timesteps": timesteps, "strengths": grid_strengths},
    "failure_masks": [e["mask_id"] for e in entries],
})
