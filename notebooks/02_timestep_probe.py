# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 02 · Timestep probe
#
# The feature timestep t_f (Step A), the modulation timestep t_m (Step C) and the number of
# denoising steps after the modulation, each swept; mean and spread over images and seeds.

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
feature_timesteps = None     # None: the whole schedule; n: n points spread over it (quick profile)
modulation_timesteps = None  # None: the whole schedule, n: n points spread over it (each costs one modulated denoising)
readout_steps = [1, 2, None] # None: full schedule with the stored inversion noise

# %%
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
feature_rows = probes.feature_timestep_sweep(ed, items, feature_timesteps, seeds)
modulation_rows = probes.modulation_timestep_sweep(ed, items, modulation_timesteps, seeds)
readout_rows = probes.readout_steps_sweep(ed, items, readout_steps, seeds)

# %%
score = "miou" if any(i.has_gt for i in items) else "boundary"
fig = viz.sweep_lines(feature_rows, "feature_timestep", [score, "boundary", "silhouette"], MODEL_LABEL,
                      "Feature timestep t_f: low-res k-means quality")
writer.save(fig, "02_timestep_probe_feature")
fig = viz.sweep_lines(modulation_rows, "modulation_timestep", ["locality", score, "vanished"], MODEL_LABEL,
                      "Modulation timestep t_m")
writer.save(fig, "02_timestep_probe_modulation")
fig = viz.sweep_lines(readout_rows, "readout_steps", ["locality", score, "energy"], MODEL_LABEL,
                      "Denoising steps after the modulation")
writer.save(fig, "02_timestep_probe_readout_steps")

# %%
writer.sidecar("02_timestep_probe", {
    "score": score, "feature_rows": feature_rows, "modulation_rows": modulation_rows, "readout_rows": readout_rows,
    "best_feature_timestep": metrics.best(feature_rows, score, "feature_timestep"),
    "best_modulation_timestep_locality": metrics.best(modulation_rows, "locality", "modulation_timestep"),
    "schedule": ed.schedule.timesteps,
})
