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
# DiffSeg's merge threshold tau; None: the model's preset, 0.1 on the reference model (its flat
# self-attention merges into one segment at the published 1.1; docs/METHOD.md), else DiffSeg's 1.1
diffseg_kl_threshold = None

# %%
from emerdiff import viz
from emerdiff.evaluation import metrics
from emerdiff.notebook import lab

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, num_clusters=num_clusters,
    num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
    modulation_strength=modulation_strength, blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init,
    max_batch=max_batch, diffseg_kl_threshold=diffseg_kl_threshold, seeds=seeds, output_dir=output_dir,
    torch_threads=torch_threads)

# %%
item = items[0]
seg = ed.segment(item.image, return_difference_maps=True, progress=False)
scores = {
    "emerdiff": metrics.score_labels(seg.labels, item),
    "nearest": metrics.score_labels(seg.nearest_labels, item),
    "bilinear": metrics.score_labels(seg.bilinear_labels, item),
}
print({k: round(v["miou"], 2) for k, v in scores.items()}, "locality", seg.locality.round(2))

# %%
fig = viz.segmentation_panels(item.image, seg, MODEL_LABEL, gt=item.label, title=f"EmerDiff quickstart: {item.name}")
writer.save(fig, "00_quickstart_segmentation")

# %% [markdown]
# ## Faithfulness: do the difference maps say what each segment controls?
#
# `seg.faithfulness` holds the measures every segmentation gets for free, each beside its chance
# level (docs/METHOD.md, "Faithfulness measures"; `emerdiff.method.measures`). *locality* (0 to 1):
# share of a map's energy inside its own mask, averaged over masks; chance = the mean mask area
# (a map blind to its mask). *agreement* (0 to 1): share of tokens whose pixel label, taken back
# to the token grid by majority, is still their own low-res segment; chance = the largest
# segment's share (one label everywhere). *symmetry* (-1 to 1): does -lambda mirror +lambda
# around the unmodulated reference I0? 1 = I- - I0 = -(I+ - I0), a response linear in lambda (so
# the pair difference I- - I+ measures one direction of change); chance 0 = the two responses
# are unrelated; -1 = both signs make the same change. Read each as its distance above chance
# (value - chance; a ratio would divide by symmetry's chance of 0): at chance the readout
# ignores what it is asked.

# %%
for measure in ("locality", "agreement", "symmetry"):
    value, chance = seg.faithfulness[measure], seg.faithfulness[f"{measure}_chance"]
    print(f"{measure:10s} {value:6.3f}   chance {chance:6.3f}   above chance {value - chance:+6.3f}")

# %% [markdown]
# ## The response maps as data
#
# Each mask's difference map (what perturbing that segment changed, ||I- - I+|| per pixel) is the
# data behind the labels: EmerDiff's label of a pixel is the mask whose map is largest there.
# One tile per mask: its outline | its map (each map scaled to its own maximum, given in its title
# with its locality: on one shared scale most maps were black).
# The maps go to `00_quickstart_maps.npz` (float16, with the mask ids, the low-res masks and the
# config), the file `emerdiff segment IMAGE --save-maps` writes beside the same contact sheet;
# `emerdiff.studies.sweep` gives such maps over any grid of layers, timesteps and strengths (notebook 03).

# %%
from emerdiff.studies.sweep import save_maps_npz
from emerdiff.viz import contact_sheet

mask_ids = list(range(seg.num_segments))
save_maps_npz(writer.out_dir / "00_quickstart_maps.npz", seg.difference_maps, mask_ids, seg.lowres_labels,
              seg.config, locality=seg.locality)
fig = contact_sheet(item.image, seg.difference_maps, seg.lowres_labels, mask_ids, seg.locality, MODEL_LABEL,
                    title=f"{item.name}: the difference map of each mask")
writer.save(fig, "00_quickstart_maps")

# %% [markdown]
# ## DiffSeg's segments, refined by EmerDiff
#
# `EmerDiff.refine(image, lowres_labels)` reads out any segments at pixel level through the
# modulated denoising. Here the segments come from DiffSeg (self-attention maps of one UNet call
# merged by KL distance; it finds K itself): left, DiffSeg alone (its proposals upsampled
# bilinearly, argmax per pixel); right, the same segments after EmerDiff's refinement, in the same
# colours (mask ids). Where the two differ, EmerDiff has moved a boundary; the numbers are each
# map's mIoU against the ground truth. (`EmerDiffConfig(lowres="diffseg")` does both in one
# `segment` call: `seg.extra_labels["diffseg"]` is DiffSeg alone.) A model whose attention is
# near uniform (the tiny test model) gives DiffSeg a single segment.

# %%
from emerdiff.method import diffseg

tau = config.diffseg_kl_threshold  # the parameter, or the model's preset
found = diffseg.diffseg(sd, item.image, config.replace(lowres="diffseg"))
refined = ed.refine(item.image, found.labels, progress=False)
diffseg_alone = found.pixel_labels(item.image.shape[:2], config.resolution, projected=refined.lowres_labels)
diffseg_scores = {"diffseg": metrics.score_labels(diffseg_alone, item),
                  "diffseg+emerdiff": metrics.score_labels(refined.labels, item)}
print(f"tau {tau}: DiffSeg found {found.num_segments} segments, {refined.num_segments} on the query grid",
      {k: round(v["miou"], 2) for k, v in diffseg_scores.items()}, refined.faithfulness)

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
viz.show(axes[0], item.image, "image")
viz.show(axes[1], viz.overlay(item.image, diffseg_alone), f"DiffSeg alone (mIoU {diffseg_scores['diffseg']['miou']:.1f})")
viz.show(axes[2], viz.overlay(item.image, refined.labels),
         f"DiffSeg + EmerDiff refine (mIoU {diffseg_scores['diffseg+emerdiff']['miou']:.1f})")
fig.suptitle(f"{item.name}: DiffSeg (tau {tau}) vs DiffSeg + EmerDiff refinement")
viz.stamp_model(fig, MODEL_LABEL)
fig.tight_layout(rect=(0, 0.03, 1, 1))
writer.save(fig, "00_quickstart_diffseg_refine")
plt.show()

# %%
writer.sidecar("00_quickstart", {
    "image": item.name, "K": config.num_clusters, "resolution": config.resolution, "num_segments": seg.num_segments,
    "labels_shape": list(seg.labels.shape), "image_shape": list(item.image.shape[:2]),
    "miou": {k: v["miou"] for k, v in scores.items()},
    "boundary": {k: v["boundary"] for k, v in scores.items()},
    "locality": seg.locality.tolist(), "locality_mean": float(seg.locality.mean()),
    "timings": seg.timings, "unet_calls": seg.unet_calls, "faithfulness": seg.faithfulness,
    "symmetry": seg.symmetry.tolist(), "maps_file": "00_quickstart_maps.npz",
    "diffseg": {"kl_threshold": tau, "num_segments": found.num_segments, "num_refined": refined.num_segments,
                "miou": {k: v["miou"] for k, v in diffseg_scores.items()},
                "faithfulness": refined.faithfulness},
})
