# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 01 · Layer probe: which UNet layers carry semantics?
#
# (a) The query vectors of **every** attention layer (self and cross, every block and resolution)
# are clustered with k-means and scored: per-image Hungarian mIoU where ground truth exists,
# otherwise the label-free *boundary alignment* (mean image gradient on segment boundaries / mean
# gradient overall; 1 = chance) and the cosine *silhouette* of the clustering (see
# `emerdiff.studies.probes`).
#
# (b) Every candidate modulation layer, scored by *locality* (share of the difference-map energy
# inside the perturbed mask) and the final mIoU.

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
feature_layers = None     # None: every attention layer
modulation_kind = "cross" # candidate modulation layers: "cross", "self" or "all" (SD3/FLUX: blocks; see probes.candidate_layers)
max_modulation_layers = 0 # 0: all candidates; n: the n candidates closest to the paper's (for quick runs)

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
feature_rows = probes.layer_probe(ed, items, layers=feature_layers, seeds=seeds)
print(len(feature_rows), "rows;", len({r["layer"] for r in feature_rows}), "layers")

# %%
score = "miou" if any(i.has_gt for i in items) else "boundary"
fig = viz.probe_bars([r for r in feature_rows if np.isfinite(r[score])], "short", score, MODEL_LABEL,
                     f"(a) k-means on each layer's queries: {viz.axis_name(score)}", hue="kind")
writer.save(fig, "01_layer_probe_features")
fig = viz.probe_heatmap(feature_rows, "short", "image", "boundary", MODEL_LABEL,
                        "(a) boundary alignment (label-free, 1 = chance)")
writer.save(fig, "01_layer_probe_features_boundary")

# %%
candidates = probes.candidate_layers(ed, modulation_kind)
if max_modulation_layers:
    # keep the paper's layer and its neighbours in the 16x16 decoder block first (SD3/FLUX: the blocks nearest
    # the preset's placeholder block)
    if sd.family in ("sd3", "flux"):
        depth = candidates.index(config.modulation_layer) if config.modulation_layer in candidates else 0
        candidates = sorted(candidates, key=lambda n: abs(candidates.index(n) - depth))[:max_modulation_layers]
    else:
        candidates = sorted(candidates, key=lambda n: (not n.startswith("up_blocks.1"), n))[:max_modulation_layers]
    if config.modulation_layer not in candidates:
        candidates[-1] = config.modulation_layer
modulation_rows = probes.modulation_layer_probe(ed, items, layers=candidates, seeds=seeds)
for r in metrics.summarize(modulation_rows, "short", ["locality", "miou"]):
    print(r)

# %%
fig = viz.probe_heatmap(modulation_rows, "short", "image", "locality", MODEL_LABEL,
                        "(b) locality of the modulation readout per layer")
writer.save(fig, "01_layer_probe_modulation_locality")
fig = viz.probe_bars(modulation_rows, "short", "miou" if score == "miou" else "boundary", MODEL_LABEL,
                     "(b) final EmerDiff score per modulation layer")
writer.save(fig, "01_layer_probe_modulation_score")

# %%
writer.sidecar("01_layer_probe", {
    "score": score, "num_layers": len({r["layer"] for r in feature_rows}),
    "feature_rows": feature_rows, "modulation_rows": modulation_rows,
    "feature_summary": metrics.summarize(feature_rows, "layer", ["miou", "boundary", "silhouette"]),
    "modulation_summary": metrics.summarize(modulation_rows, "layer", ["locality", "miou", "boundary"]),
    "best_feature_layer": metrics.best(feature_rows, score, "layer"),
    "best_modulation_layer_locality": metrics.best(modulation_rows, "locality", "layer"),
    "paper_query_layer": config.query_layer, "paper_modulation_layer": config.modulation_layer,
})
