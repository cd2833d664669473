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
strengths = [-100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0]
ks = [2, 4, 8]

# %%
from emerdiff import lab, probes, viz

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, K=K,
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
fig = viz.sweep_lines(k_long, "K", ["score"], MODEL_LABEL, f"Number of segments K ({score})", hue="method")
writer.save(fig, "03_magnitude_probe_k")
fig = viz.sweep_lines([r for r in lambda_rows if r["mode"] == "pair"] , "lambda", ["vanished", "saturated"],
                      MODEL_LABEL, "Failure modes vs lambda (pair readout)")
writer.save(fig, "03_magnitude_probe_failure_modes")

# %%
writer.sidecar("03_magnitude_probe", {
    "score": score, "lambda_rows": lambda_rows, "k_rows": k_rows,
    "lambda_summary": probes.summarize(lambda_rows, ["lambda", "mode"], ["locality", "miou", "energy", "vanished"]),
    "k_summary": probes.summarize(k_rows, "K", ["miou", "miou_nearest", "miou_bilinear", "locality", "vanished"]),
})
