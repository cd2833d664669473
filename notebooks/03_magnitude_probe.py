# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 03 · Magnitude probe: lambda and K
#
# lambda swept over both signs. *one-sided* rows compare I(lambda) with the unmodulated
# reconstruction I0 of the same batch; *pair* rows are EmerDiff's ||I- - I+|| at |lambda|.
# lambda = 0 changes nothing: locality is reported as 0 and the row flagged `degenerate`. Then K
# swept, against the nearest / bilinear upsampling of the same segments. Failure modes plotted:
# segments that vanish from the argmax, saturated pixels, energy spilling outside the mask.

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
strengths = [-100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0]
ks = [2, 4, 8]
sweep_timesteps = None    # t_m grid of the emerdiff.studies.sweep section (on the schedule); None: t_m and ~200 steps noisier

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
lambda_rows = probes.lambda_sweep(ed, items, strengths, seeds)
k_rows = probes.k_sweep(ed, items, ks, seeds)

# %%
score = "miou" if any(i.has_gt for i in items) else "boundary"
fig = viz.sweep_lines(lambda_rows, "lambda", ["locality", score, "energy"], MODEL_LABEL,
                      "Modulation strength lambda (both signs)", hue="mode")
writer.save(fig, "03_magnitude_probe_lambda")
k_long = [dict(K=r["K"], method=m, score=r[key], image=r["image"])
          for r in k_rows for m, key in (("EmerDiff", score), ("nearest", score + "_nearest"), ("bilinear", score + "_bilinear"))]
fig = viz.sweep_lines(k_long, "K", ["score"], MODEL_LABEL, f"Number of segments K ({viz.axis_name(score)})",
                      hue="method", names={"score": viz.axis_name(score)})
writer.save(fig, "03_magnitude_probe_k")
fig = viz.sweep_lines([r for r in lambda_rows if r["mode"] == "pair"] , "lambda", ["vanished", "saturated"],
                      MODEL_LABEL, "Failure modes vs lambda (pair readout)")
writer.save(fig, "03_magnitude_probe_failure_modes")

# %% [markdown]
# ## Response maps as data: `emerdiff.studies.sweep` over lambda x t_m
#
# `emerdiff.studies.sweep` returns one record per (layer, t_m, lambda, mask) of a grid: the difference map
# and its scores, a tidy table for pandas. Here the first image, the positive strengths above (the
# pair readout is the same at -lambda) and two modulation timesteps. Each panel: the mean over the
# masks vs lambda, one line per t_m, and the chance level (dashed). *locality*: share of a map's
# energy inside its mask (chance: the mask's area); *symmetry*: does -lambda mirror +lambda
# around the unmodulated image (1: a linear response, 0: unrelated, the chance level);
# *setting_agreement*: share of tokens that keep their segment in the argmax (chance: the
# largest segment's share). A good lambda is local and agreeing while still near-symmetric.

# %%
import pandas as pd

import emerdiff

sweep_strengths = [lam for lam in strengths if lam > 0]
schedule = list(ed.schedule.timesteps)
sweep_ts = sweep_timesteps or sorted({config.modulation_timestep,
                                      min(schedule, key=lambda t: abs(t - config.modulation_timestep - 200))})
records = emerdiff.sweep(items[0].image, timesteps=sweep_ts, strengths=sweep_strengths, ed=ed, progress=False)
table = pd.DataFrame(records)
measures = ["locality", "mask_area", "symmetry", "setting_agreement", "agreement_chance"]
table.groupby(["modulation_timestep", "modulation_strength"])[measures].mean().round(3)

# %%
chance = {"locality": table["mask_area"].mean(), "symmetry": 0.0, "setting_agreement": table["agreement_chance"].mean()}
fig = viz.sweep_lines(records, "modulation_strength", ["locality", "symmetry", "setting_agreement"], MODEL_LABEL,
                      f"emerdiff.studies.sweep on {items[0].name}: mean over masks vs lambda", hue="modulation_timestep",
                      reference=chance, logx=True)
writer.save(fig, "03_magnitude_probe_sweep")

# %%
writer.sidecar("03_magnitude_probe", {
    "score": score, "lambda_rows": lambda_rows, "k_rows": k_rows,
    "lambda_summary": metrics.summarize(lambda_rows, ["lambda", "mode"], ["locality", "miou", "energy", "vanished"]),
    "k_summary": metrics.summarize(k_rows, "K", ["miou", "miou_nearest", "miou_bilinear", "locality", "vanished"]),
    "sweep_rows": [{k: v for k, v in r.items() if k != "map"} for r in records],
})
