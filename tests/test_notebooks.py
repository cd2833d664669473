"""Every study notebook runs top to bottom through papermill on the tiny pipeline at small size,
writes the figures it must write (PNG and PDF) and records its key numbers in a JSON sidecar."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Small everything: 4x4 token grid, 10-step schedule, one image with ground truth, one thread
# (on a busy 2-core machine one torch thread is several times faster than two).
COMMON = dict(model="tiny", device="cpu", images=["voc_sample"], resolution=128, num_clusters=4,
              num_inference_steps=10, modulation_timestep=201, seeds=[0], torch_threads=1)
EXTRA = {
    "00_quickstart": {},
    "01_layer_probe": dict(max_modulation_layers=2),
    "02_timestep_probe": dict(feature_timesteps=[901, 1], modulation_timesteps=[201, 101],
                              readout_steps=[1, None]),
    "03_magnitude_probe": dict(strengths=[-10.0, 0.0, 10.0], ks=[2, 4]),
    "04_paper_figures": dict(grid_layers=["up_blocks.1.attentions.2.transformer_blocks.0.attn2"],
                             grid_timesteps=[201, 101], grid_strengths=[10.0]),
    "05_inspector": dict(mpl_backend="agg", slider_timesteps=[201, 101]),
    "06_diagnosis": dict(settings=[{}, {"readout_steps": 1}, {"modulation_timestep": 101}], example_masks=2),
    # two validation scenes: with two, every bootstrap draw is one of three resamples, the full data among them
    "07_evaluation": dict(first_scene=100, num_scenes=2, bootstrap=100, examples=1),
}
FIGURES = {
    "00_quickstart": ["00_quickstart_segmentation", "00_quickstart_maps", "00_quickstart_diffseg_refine"],
    "01_layer_probe": ["01_layer_probe_features", "01_layer_probe_features_boundary",
                       "01_layer_probe_modulation_locality", "01_layer_probe_modulation_score"],
    "02_timestep_probe": ["02_timestep_probe_feature", "02_timestep_probe_modulation",
                          "02_timestep_probe_readout_steps"],
    "03_magnitude_probe": ["03_magnitude_probe_lambda", "03_magnitude_probe_k", "03_magnitude_probe_failure_modes",
                           "03_magnitude_probe_sweep"],
    "04_paper_figures": ["fig1_teaser", "fig2_key_observation", "fig4_upsampling_vs_emerdiff",
                         "fig_ablation_layer_timestep_lambda", "fig_failure_cases", "fig_open_vocabulary"],
    "05_inspector": ["05_inspector"],
    "06_diagnosis": ["06_diagnosis_locality_by_stage", "06_diagnosis_stage_maps", "06_diagnosis_label_moves",
                     "06_diagnosis_settings_locality", "06_diagnosis_settings_accuracy",
                     "06_diagnosis_deletion"],
    "07_evaluation": ["07_evaluation_miou", "07_evaluation_per_class", "07_evaluation_examples"],
}


def kernel_name() -> str:
    """The project's kernel (registered by `make setup`), else the venv's default python3."""
    from emerdiff.cli.app import jupyter_kernel

    return jupyter_kernel("emerdiff")


def run_notebook(name: str, out: Path, **overrides) -> dict:
    params = {**COMMON, **EXTRA[name], "output_dir": str(out / "figures"), **overrides}  # overrides win
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                               parameters=params, kernel_name=kernel_name(), cwd=str(out),
                               progress_bar=False)
    sidecar = out / "figures" / f"{name}.json"
    assert sidecar.exists(), f"{name} wrote no sidecar"
    data = json.loads(sidecar.read_text())
    if "model" not in overrides:
        assert data["model"].startswith("tiny")
    assert data["figures"] == FIGURES[name]
    for fig in FIGURES[name]:
        assert_drawn(out / "figures" / f"{fig}.png", out / "figures" / f"{fig}.pdf")
    return data


def assert_drawn(png: Path, pdf: Path) -> None:
    """A figure that shows something: a readable PNG of a sensible size whose pixels are not one flat
    colour (a blank or failed draw is), and a complete PDF beside it."""
    from PIL import Image

    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
    h, w, _ = pixels.shape
    assert min(h, w) >= 150, f"{png.name}: {w}x{h} px is no figure"
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) >= 16, f"{png.name}: only {len(colours)} colours: a blank or flat drawing"
    # some content off the background: at least 2 % of the pixels differ from the most common colour
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert 1 - counts.max() / counts.sum() >= 0.02, f"{png.name}: almost every pixel is background"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"%%EOF" in data[-1024:], f"{pdf.name} is not a complete PDF"


def finite_in(x, lo, hi) -> bool:
    return x is not None and math.isfinite(x) and lo <= x <= hi


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == sorted(FIGURES)


def test_committed_notebooks_have_no_outputs():
    """The tracked notebooks stay output-free (JupyterLab's save hook keeps outputs in executed/lab/)."""
    import nbformat

    from emerdiff.notebook.lab import has_outputs

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        assert not has_outputs(nbformat.read(path, as_version=4)), f"{path.name} has outputs: clear them"


def test_hand_run_notebooks_write_to_ignored_places(tmp_path):
    """Run from JupyterLab, figures go to figures/lab/ and saved outputs to notebooks/executed/lab/:
    both ignored by git, so running a notebook by hand leaves the working tree clean."""
    import subprocess

    import nbformat

    from emerdiff.notebook.lab import LAB_COPIES, default_figure_dir, pre_save

    places = [default_figure_dir() / "x.png", NOTEBOOKS / LAB_COPIES / "05_inspector.ipynb"]
    for place in places:
        rel = place.relative_to(ROOT)
        assert subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=ROOT).returncode == 0, rel
    # the save hook: outputs kept beside the notebook under executed/lab/, stripped from what is saved
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nb.cells[0].execution_count = 1
    model = {"type": "notebook", "content": nb}

    class Manager:
        root_dir = str(tmp_path)

    pre_save(model, "sub/a.ipynb", Manager())
    assert not nbformat.validate(model["content"]) and model["content"].cells[0].outputs == []
    kept = nbformat.read(tmp_path / "sub" / LAB_COPIES / "a.ipynb", as_version=4)
    assert kept.cells[0].outputs[0]["data"]["text/plain"] == "2"
    lab_config = (NOTEBOOKS / "jupyter_server_config.py").read_text()
    assert "emerdiff.notebook.lab.pre_save" in lab_config


def test_parameters_cell_is_tagged():
    import nbformat

    for name in FIGURES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for key in ("model", "images", "device", "resolution", "num_clusters", "seeds", "output_dir"):
            assert f"\n{key} = " in "\n" + tagged[0].source, (name, key)


def test_00_quickstart(tmp_path):
    data = run_notebook("00_quickstart", tmp_path)
    assert data["num_segments"] == 4
    assert data["labels_shape"] == data["image_shape"]
    for method in ("emerdiff", "nearest", "bilinear"):
        assert finite_in(data["miou"][method], 0, 100)  # voc_sample has ground truth
    assert all(finite_in(v, 0, 1) for v in data["locality"])
    assert data["unet_calls"]["modulation"] >= 1
    faith = data["faithfulness"]
    assert faith["symmetry_chance"] == 0 and finite_in(faith["locality_chance"], 0, 1)
    assert len(data["symmetry"]) == data["num_segments"]
    per_mask = [v for v in data["symmetry"] if v is not None]  # None: a mask whose runs changed nothing
    assert per_mask and all(finite_in(v, -1, 1) for v in per_mask)
    assert math.isclose(faith["symmetry"], sum(per_mask) / len(per_mask), rel_tol=1e-9)
    # the response maps as data (what `segment --save-maps` writes): one map per mask, masks a partition
    with np.load(tmp_path / "figures" / data["maps_file"]) as z:
        maps, ids, masks = z["maps"], z["mask_ids"], z["lowres_masks"]
        assert maps.dtype == np.float16 and maps.shape == (4, 128, 128)
        assert ids.tolist() == [0, 1, 2, 3] and (masks.sum(axis=0) == 1).all()
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() > 0
        assert np.allclose(z["locality"], data["locality"])


def test_00_quickstart_sdxl(tmp_path):
    """The quickstart on an SDXL-layout folder (two text encoders, added time/text conditioning):
    the notebooks take SDXL through the same load_pipeline path as SD."""
    from builders import build_tiny_sdxl_pipeline

    folder = build_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl")
    (tmp_path / "run").mkdir()
    data = run_notebook("00_quickstart", tmp_path / "run", model=str(folder))
    assert data["num_segments"] == 4 and data["labels_shape"] == data["image_shape"]
    assert all(finite_in(v, 0, 1) for v in data["locality"])
    assert finite_in(data["faithfulness"]["agreement"], 0, 1)
    assert data["unet_calls"]["modulation"] >= 1


def test_01_layer_probe(tmp_path):
    data = run_notebook("01_layer_probe", tmp_path)
    assert data["score"] == "miou"
    assert data["num_layers"] == 32  # every self- and cross-attention layer of the SD-shaped UNet
    assert len(data["feature_rows"]) == 32
    assert {r["kind"] for r in data["feature_rows"]} == {"self", "cross"}
    assert all(finite_in(r["miou"], 0, 100) for r in data["feature_rows"])
    assert len(data["modulation_rows"]) == 2
    assert data["paper_modulation_layer"] in {r["layer"] for r in data["modulation_rows"]}
    assert all(finite_in(r["locality"], 0, 1) for r in data["modulation_rows"])
    assert data["best_feature_layer"] in {r["layer"] for r in data["feature_rows"]}


def test_02_timestep_probe(tmp_path):
    data = run_notebook("02_timestep_probe", tmp_path)
    assert [r["feature_timestep"] for r in data["feature_rows"]] == [901, 1]
    assert [r["modulation_timestep"] for r in data["modulation_rows"]] == [201, 101]
    assert [r["steps_after"] for r in data["modulation_rows"]] == [3, 2]
    assert [r["readout_steps"] for r in data["readout_rows"]] == [1, 3]
    assert all(finite_in(r["locality"], 0, 1) for r in data["modulation_rows"] + data["readout_rows"])
    assert data["best_feature_timestep"] in (901, 1)


def test_03_magnitude_probe(tmp_path):
    data = run_notebook("03_magnitude_probe", tmp_path)
    one = {r["lambda"]: r for r in data["lambda_rows"] if r["mode"] == "one-sided"}
    assert sorted(one) == [-10.0, 0.0, 10.0]
    assert one[0.0]["degenerate"] and one[0.0]["locality"] == 0.0 and one[0.0]["energy"] == 0.0
    assert one[10.0]["energy"] > 0 and one[-10.0]["energy"] > 0
    pair = {r["lambda"]: r for r in data["lambda_rows"] if r["mode"] == "pair"}
    assert sorted(pair) == [0.0, 10.0] and pair[0.0]["degenerate"]
    assert [r["K"] for r in data["k_rows"]] == [2, 4]
    assert all(finite_in(r[m], 0, 100) for r in data["k_rows"] for m in ("miou", "miou_nearest", "miou_bilinear"))


def test_04_paper_figures(tmp_path):
    data = run_notebook("04_paper_figures", tmp_path)
    assert finite_in(data["key_locality"], 0, 1)
    assert data["key_difference_max"] > 0
    assert data["grid"]["timesteps"] == [201, 101]
    assert all(finite_in(v, 0, 100) for v in data["miou"][0].values())
    assert len(data["failure_masks"]) >= 2
    ov = data["open_vocabulary"]
    assert len(ov["vocabulary"]) == 6 and all(0 <= c < 6 for c in ov["mask_classes"])


def test_05_inspector(tmp_path):
    data = run_notebook("05_inspector", tmp_path)
    assert data["errors"] == []
    # flipping lambda's sign changes I+/I-; selecting another segment changes the highlight
    assert data["changed"]["plus"] and data["changed"]["minus"] and data["changed"]["image"]
    assert data["restored"]  # the last cell leaves the widget in its starting state
    assert data["displayed"]["labels"][:2] == data["displayed"]["difference"][:2]


def test_06_diagnosis(tmp_path):
    data = run_notebook("06_diagnosis", tmp_path)
    assert data["stages"] == ["modulated_call", "denoised_latent", "decoded", "decoder_alone"]
    assert all(finite_in(v, 0, 1) for v in data["stage_summary"].values())
    (row,) = data["rows"]  # one image with ground truth
    assert finite_in(row["fixed_band"], 0, 1) and finite_in(row["broken_interior"], 0, 1)
    assert [r["setting"] for r in data["sweep_rows"]] == ["configured", "readout_steps=1", "t_m=101"]
    # the paper row of the sweep is the pipeline's own readout: the same locality as (a)
    assert math.isclose(data["sweep_rows"][0]["locality"], row["decoded"], rel_tol=1e-4)


def test_07_evaluation(tmp_path):
    data = run_notebook("07_evaluation", tmp_path)
    assert data["shared_images"] == 2 and data["only_a"] == [] and data["only_b"] == []
    assert data["segmentation_config"]["A"]["lowres"] == "kmeans"
    assert data["segmentation_config"]["B"]["lowres"] == "diffseg"
    rows = {(r["protocol"], r["method"]): r for r in data["comparison"]}
    protocols = ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean")
    methods = ("emerdiff", "nearest", "bilinear", "guided_filter", "joint_bilateral", "diffseg")
    assert set(rows) == {(p, m) for p in protocols for m in methods}
    for (protocol, method), row in rows.items():
        if method == "diffseg":  # DiffSeg alone is a method of run B only
            assert row["a"] is None and row["a-b"] is None and finite_in(row["b"]["value"], 0, 100)
            continue
        a, b, d = row["a"], row["b"], row["a-b"]
        for v, lo, hi in ((a, 0, 100), (b, 0, 100), (d, -100, 100)):
            assert finite_in(v["value"], lo, hi), row
            if v.get("note"):  # zero spread over the resamples: no interval, and it says so
                assert v["lo"] is None and v["hi"] is None, row
                continue
            assert finite_in(v["lo"], lo, hi) and finite_in(v["hi"], lo, hi), row
            # two scenes: the full data is one of the three resamples, so every interval holds its estimate
            assert v["lo"] <= v["value"] <= v["hi"], row
        assert math.isclose(d["value"], a["value"] - b["value"], abs_tol=1e-9), row
    # compare_runs recomputes each run on the shared scenes with the same resamples: its A and B columns
    # are the runs' own results (a mispaired or re-seeded comparison would differ)
    for side, key in (("A", "a"), ("B", "b")):
        for own in data["runs"][side]:
            mine = rows[(own["protocol"], own["method"])][key]
            for field, theirs in (("value", own["miou"]), ("lo", own["miou_lo"]), ("hi", own["miou_hi"])):
                assert math.isclose(mine[field], theirs, abs_tol=1e-6), (side, own, mine)
    # within a run: EmerDiff minus each other method of the same records, paired
    within = {(r["run"], r["protocol"], r["difference"]): r for r in data["within_run"]}
    assert {d for run, _, d in within if run == "B"} == {f"emerdiff-{m}" for m in methods[1:]}
    for (run, protocol, difference), r in within.items():
        other = difference.split("-", 1)[1]
        key = "a" if run == "A" else "b"
        expected = rows[(protocol, "emerdiff")][key]["value"] - rows[(protocol, other)][key]["value"]
        assert math.isclose(r["value"], expected, abs_tol=1e-6), r
        assert r.get("note") or r["lo"] <= r["value"] <= r["hi"], r


def test_01_layer_probe_mmdit(tmp_path):
    """Notebook 01 sweeps blocks instead of UNet layers on an SD3 folder (issue 28; tiny, plain diffusers)."""
    from builders import build_tiny_sd3_pipeline

    folder = build_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    (tmp_path / "run").mkdir()
    data = run_notebook("01_layer_probe", tmp_path / "run", model=str(folder), modulation_timestep=None)
    # every attention of the 3 blocks (block 0 also has SD3.5's image-only attn2)
    assert [r["layer"] for r in data["feature_rows"]] == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2",
                                                         "transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    assert {r["kind"] for r in data["feature_rows"]} == {"joint", "image"}
    assert len(data["modulation_rows"]) == 2 and {r["kind"] for r in data["modulation_rows"]} == {"joint"}
    assert data["paper_modulation_layer"] in {r["layer"] for r in data["modulation_rows"]}
    assert all(finite_in(r["locality"], 0, 1) for r in data["modulation_rows"])


def test_02_timestep_probe_mmdit(tmp_path):
    """Notebook 02 on a FLUX folder: the sweeps run over the flow schedule's integer timesteps (issue 28)."""
    from builders import build_tiny_flux_pipeline

    folder = build_tiny_flux_pipeline(tmp_path / "tiny-flux")
    (tmp_path / "run").mkdir()
    data = run_notebook("02_timestep_probe", tmp_path / "run", model=str(folder), modulation_timestep=None,
                        feature_timesteps=2, modulation_timesteps=2, readout_steps=[1, None])
    schedule = data["schedule"]
    assert schedule[0] == 1000 and len(schedule) == 10
    assert all(r["feature_timestep"] in schedule for r in data["feature_rows"])
    assert all(r["modulation_timestep"] in schedule for r in data["modulation_rows"])
    assert all(finite_in(r["locality"], 0, 1) for r in data["modulation_rows"] + data["readout_rows"])
