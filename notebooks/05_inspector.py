# ---
# jupyter:
#   kernelspec:
#     display_name: Python (emerdiff)
#     language: python
#     name: emerdiff
# ---

# %% [markdown]
# # 05 · Perturbation inspector
#
# Pick an image, click a segment (or choose it from the list), move the lambda / timestep sliders
# and the layer dropdown; I+, I-, the difference map and the full-resolution labels update. The
# inversion is cached per image up to the largest timestep of the slider. A slider move first runs
# only the chosen segment's +/-lambda pair (about 0.6 s on a CPU for the reference model); the
# labels panel says "STALE" (in red, with the setting its labels belong to) until the other
# segments' pairs have followed. The controls sit beside the figure, so both fit a 1400x900
# window; the segment panel and the labels panel colour a segment alike. Errors in callbacks
# appear in the log below the figure.

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
mpl_backend = "widget"   # ipympl; "agg" for headless runs
slider_timesteps = None  # None: every schedule timestep up to modulation_timestep

# %%
import numpy as np

from emerdiff.notebook import lab

sd, config, ed, items, writer, MODEL_LABEL = lab.setup(
    model, device=device, dtype=dtype, images=images, resolution=resolution, num_clusters=num_clusters,
    num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
    modulation_strength=modulation_strength, blur_sigma=blur_sigma, kmeans_n_init=kmeans_n_init,
    max_batch=max_batch, seeds=seeds, output_dir=output_dir, torch_threads=torch_threads)

# %%
import matplotlib
from IPython import get_ipython

if mpl_backend == "widget":
    get_ipython().run_line_magic("matplotlib", "widget")
else:
    matplotlib.use(mpl_backend)
from emerdiff.notebook.inspector import Inspector  # after the backend is chosen

inspector = Inspector(ed, {i.name: i.image for i in items}, timesteps=slider_timesteps)
inspector.widget

# %% [markdown]
# Programmatic use (what the tests do): set widget values, read `inspector.displayed`; the cell
# then puts the starting values back, so the widget above still shows its starting state.

# %%
start = (inspector.lambda_slider.value, inspector.segment_select.value)
before = {k: v.copy() for k, v in inspector.displayed.items()}
inspector.lambda_slider.value = -start[0]
inspector.segment_select.value = (start[1] + 1) % inspector.num_segments
changed = {k: bool(not np.array_equal(before[k], v)) for k, v in inspector.displayed.items() if k in before}
# back to the starting state (cached: no recompute), so the widget above shows what it started with
inspector.lambda_slider.value, inspector.segment_select.value = start
restored = all(np.array_equal(before[k], v) for k, v in inspector.displayed.items())
print(changed, "restored:", restored, inspector.errors)
writer.save(inspector.fig, "05_inspector")
writer.sidecar("05_inspector", {"changed": changed, "restored": restored, "errors": inspector.errors,
                                "displayed": {k: list(v.shape) for k, v in inspector.displayed.items()},
                                "cache": inspector.cache_info()})
