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
# `emerdiff segment`): the reference model 128 px, num_clusters 8, blur 1, batch 17, t_m 81; Stable
# Diffusion the paper's 512 px, num_clusters 25, blur 4, t_m 281; both 50 steps.
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
torch_threads = 0         # 0: torch default; 1 is much faster on a busy shared CPU
key_mask = None               # None: the mask with the highest locality on the first image
grid_layers = None            # None: the three cross-attention layers of the 16x16 decoder block
grid_timesteps = None         # None: three timesteps spread over the schedule's lower half
grid_strengths = [-10.0, 10.0, 100.0]
vocabulary = "person, sky, grass, water, building, animal"  # open-vocabulary legend (first image)

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
# one row per layer, one column per (timestep, lambda): wide and short rather than 9 rows tall
grid = [[maps[(l, t, float(s))] for t in timesteps for s in grid_strengths] for l in layers]
columns = [f"t={t}\nlambda={s:g}" for t in timesteps for s in grid_strengths]
fig = viz.heatmap_grid(grid, [probes.short_layer(l) for l in layers], columns, MODEL_LABEL,
                       f"Difference maps of mask {mask_id}: layer (rows) x timestep x lambda (columns)", cell=1.4)
writer.save(fig, "fig_ablation_layer_timestep_lambda")

# %%
entries = probes.failure_entries(seg, item.image, n=2)
fig = viz.failure_cases(entries, MODEL_LABEL)
writer.save(fig, "fig_failure_cases")

# %% [markdown]
# Open vocabulary: each EmerDiff mask named by the diffusion model's own cross-attention
# (DAAM-style, no extra model), with its legend. `emerdiff.method.vocabulary.CLIPMaskLabeller` does the
# same with MaskCLIP features. **Caveat:** on the small models (reference, tiny) this labeller is
# near chance (reference v1, 100 held-out scenes: 2.2 mIoU, `docs/reference/v1_heldout_results.md`);
# the figure says so, and its names are an illustration of the interface, not a result.

# %%
from emerdiff.method.vocabulary import CrossAttentionLabeller
from emerdiff.viz import legend_figure

labeller = CrossAttentionLabeller(sd, resolution=config.resolution, seed=config.seed)
named = labeller.label(item.image, seg, vocabulary)
# small (<= 128 px) models: the labeller is near chance, so the figure must not read as a result
caveat = ("" if config.resolution >= 512 else "Caveat: on this small model the cross-attention labeller is near chance "
          "(reference v1: 2.2 mIoU on 100 held-out scenes); these names illustrate the interface, they are not a result.")
fig = legend_figure(item.image, named, title=f"open-vocabulary labels (cross-attention) · {MODEL_LABEL}",
                    caveat=caveat)
writer.save(fig, "fig_open_vocabulary")

# %%
writer.sidecar("04_paper_figures", {
    "open_vocabulary": {"vocabulary": named.vocabulary, "mask_classes": named.mask_classes.tolist()},
    "images": [i.name for i in items], "key_mask": mask_id, "key_locality": float(seg.locality[mask_id]),
    "key_difference_max": float(diff.max()), "miou": scores,
    "grid": {"layers": layers, "timesteps": timesteps, "strengths": grid_strengths},
    "failure_masks": [e["mask_id"] for e in entries],
})
