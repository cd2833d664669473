# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 00 · Quickstart
#
# Load a model, segment one image, compare EmerDiff with the low-res k-means and its upsampling
# baselines.

# %% tags=["parameters"]
# --- parameters (papermill overrides these; `make figures` passes model, device, output_dir) ---
model = "reference"       # "reference" (ours, trained), "tiny" (random), a diffusers folder or hub id
device = "cpu"            # "cpu", "cuda", ...
dtype = None              # None: fp32 on CPU, fp16 on CUDA
images = ["scene:0", "scene:1", "voc_sample"]  # scene:N / voc_sample have GT; skimage names; paths
# Sizes: None takes the model's own (emerdiff.cli.figure_sizes): the reference model 128 px, K 8,
# blur 1, batch 17; Stable Diffusion the paper's 512 px, K 25, blur 4; both 50 steps and t_m 281.
resolution = None
K = None
num_inference_steps = None
modulation_timestep = None  # must lie on the schedule
modulation_strength = 10.0
blur_sigma = None
kmeans_n_init = 2
max_batch = None          # UNet batch of the modulated denoising (2K + 1: every run and the reference at once)
seeds = [0]
output_dir = None         # None: figures/lab/ of the checkout (ignored by git); `make figures` passes figures/
torch_threads = 0         # 0: torch default; 1 is much faster on a busy shared CPU

# %%
from emerdiff import lab, probes, viz

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, K=K,
    num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
    modulation_strength=modulation_strength, blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init,
    max_batch=max_batch, seeds=seeds, output_dir=output_dir, torch_threads=torch_threads)

# %%
item = items[0]
seg = ed.segment(item.image, return_difference_maps=True, progress=False)
scores = {
    "emerdiff": probes.score_labels(seg.labels, item),
    "nearest": probes.score_labels(seg.nearest_labels, item),
    "bilinear": probes.score_labels(seg.bilinear_labels, item),
}
print({k: round(v["miou"], 2) for k, v in scores.items()}, "locality", seg.locality.round(2))

# %%
fig = viz.segmentation_panels(item.image, seg, MODEL_LABEL, gt=item.label, title=f"EmerDiff quickstart: {item.name}")
writer.save(fig, "00_quickstart_segmentation")

# %%
writer.sidecar("00_quickstart", {
    "image": item.name, "K": config.num_clusters, "resolution": config.resolution, "num_segments": seg.num_segments,
    "labels_shape": list(seg.labels.shape), "image_shape": list(item.image.shape[:2]),
    "miou": {k: v["miou"] for k, v in scores.items()},
    "boundary": {k: v["boundary"] for k, v in scores.items()},
    "locality": seg.locality.tolist(), "locality_mean": float(seg.locality.mean()),
    "timings": seg.timings, "unet_calls": seg.unet_calls,
})
