"""One preset table (emerdiff.config.PRESETS), applied alike by every door: the Python API
(EmerDiffConfig.for_model), the command line (segment, refine, evaluate, figures) and the notebooks
(emerdiff.notebook.lab.setup). For each model kind the three give the same config field by field,
and a change given through any door lands in the config."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from emerdiff.config import PRESETS, EmerDiffConfig, model_kind, preset


# ------------------------------------------------------------------ models of every kind
@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from builders import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    """An SD 1.5-shaped folder: its UNet and VAE configs only (no weights; read, never loaded)."""
    from builders import unet_config

    folder = tmp_path_factory.mktemp("sd15") / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config("sd15")))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    return folder


@pytest.fixture
def models(tiny_dir, sdxl_dir, sd15_dir):
    """model -> its expected kind: one of each (names, a saved tiny SD at 256 px native, a tiny SDXL, SD 1.5)."""
    return {"tiny": "tiny", "reference": "reference", str(tiny_dir): "paper", str(sdxl_dir): "sdxl",
            str(sd15_dir): "paper"}


def cli_config(command: str, model: str, *flags: str) -> EmerDiffConfig:
    """The config `command` builds from these arguments, by the command's own path, without running it."""
    from emerdiff.cli.app import build_parser
    from emerdiff.cli.options import config_from_args

    head = {"segment": ["segment", "x.png"], "refine": ["refine", "x.png", "--masks", "m.png"],
            "evaluate": ["evaluate", "--data", "d", "--out", "o"]}[command]
    return config_from_args(build_parser().parse_args([*head, "--model", model, *flags]))


def differing(a: EmerDiffConfig, b: EmerDiffConfig) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(EmerDiffConfig)
            if getattr(a, f.name) != getattr(b, f.name)}


# ------------------------------------------------------------------ the table
def test_the_reference_preset_is_what_the_heldout_tables_used():
    assert PRESETS["reference"] == dict(resolution=128, num_clusters=8, num_inference_steps=50,
                                        modulation_timestep=81, blur_sigma=1.0, max_batch=17,
                                        diffseg_kl_threshold=0.1)
    assert set(PRESETS) >= {"paper", "reference", "tiny", "sdxl"}
    fields = {f.name for f in dataclasses.fields(EmerDiffConfig)}
    for kind, values in PRESETS.items():
        assert set(values) <= fields, kind  # one name per setting: the config's field names
        EmerDiffConfig(**values).check_values()


def test_model_kinds(models):
    assert {m: model_kind(m) for m in models} == models


def test_sdxl_preset_takes_resolution_and_layers_from_the_model(sdxl_dir):
    from emerdiff.sd.layers import family_defaults

    own = family_defaults(str(sdxl_dir))
    assert own and preset(str(sdxl_dir)) == {**PRESETS["sdxl"], **own}
    config = EmerDiffConfig.for_model(str(sdxl_dir))
    assert (config.resolution, config.query_layer) == (own["resolution"], own["query_layer"])
    assert config.query_layer != EmerDiffConfig().query_layer


# ------------------------------------------------------------------ API = CLI = notebook
def test_api_cli_and_notebook_give_one_config_per_model_kind(models):
    from emerdiff.notebook.lab import study_config

    for model, kind in models.items():
        api = EmerDiffConfig.for_model(model)
        assert {k: getattr(api, k) for k in PRESETS[kind]} == PRESETS[kind], model
        for command in ("segment", "evaluate"):
            assert cli_config(command, model) == api, (model, command, differing(cli_config(command, model), api))
        # refine: every setting alike; K is the number of segments given in --masks
        assert cli_config("refine", model) == api
        assert study_config(model) == api, (model, differing(study_config(model), api))


def test_loaded_models_get_the_preset_of_their_name(tiny_model, tiny_dir, sdxl_dir):
    from emerdiff.sd.loading import load_pipeline

    assert EmerDiffConfig.for_model(tiny_model) == EmerDiffConfig.for_model(str(tiny_dir))
    assert EmerDiffConfig.for_model(load_pipeline("tiny", device="cpu")) == EmerDiffConfig.for_model("tiny")
    assert EmerDiffConfig.for_model(load_pipeline(sdxl_dir, device="cpu")) == EmerDiffConfig.for_model(str(sdxl_dir))


@pytest.mark.parametrize("model", ["tiny", "reference", "tiny_dir", "sdxl_dir"])
def test_lab_setup_builds_the_api_config(model, request, tmp_path, capsys):
    """The notebooks' setup (parameters left None, as in every parameters cell) = for_model."""
    from emerdiff.notebook.lab import setup

    name = str(request.getfixturevalue(model)) if model.endswith("_dir") else model
    study = setup(name, images=["astronaut"], output_dir=tmp_path)
    assert study.config == EmerDiffConfig.for_model(name), differing(study.config, EmerDiffConfig.for_model(name))
    assert study.ed.config is study.config
    line = capsys.readouterr().out
    assert f"num_clusters {study.config.num_clusters}," in line and " K " not in line


# ------------------------------------------------------------------ a user change lands, through every door
CHANGES = dict(num_clusters=3, blur_sigma=0.5, modulation_timestep=101, diffseg_kl_threshold=0.7, kmeans_n_init=2)


def test_a_change_lands_through_every_door(tmp_path):
    from emerdiff.notebook.lab import setup, study_config

    for model in ("tiny", "reference"):
        expected = EmerDiffConfig.for_model(model, **CHANGES)
        base = EmerDiffConfig.for_model(model)
        assert all(getattr(expected, k) == v != getattr(base, k) for k, v in CHANGES.items())
        flags = ["--num-clusters", "3", "--blur-sigma", "0.5", "--modulation-timestep", "101",
                 "--set", "diffseg_kl_threshold=0.7", "--set", "kmeans_n_init=2"]
        for command in ("segment", "evaluate"):
            assert cli_config(command, model, *flags) == expected, command
        sets = [x for k, v in CHANGES.items() for x in ("--set", f"{k}={json.dumps(v)}")]
        assert cli_config("segment", model, *sets) == expected
        assert study_config(model, **CHANGES) == expected
    study = setup("tiny", images=["astronaut"], output_dir=tmp_path, seeds=[4], **CHANGES)
    assert study.config == EmerDiffConfig.for_model("tiny", seed=4, **CHANGES)


def test_flags_left_out_take_the_preset_not_the_paper():
    """A flag given changes its field only: the other fields stay the model's preset."""
    config = cli_config("segment", "reference", "--num-clusters", "5", "--seed", "3", "--no-injection",
                        "--modulation-strength", "-2", "--num-inference-steps", "25")
    assert config == EmerDiffConfig.for_model("reference", num_clusters=5, seed=3, attention_injection=False,
                                              modulation_strength=-2.0, num_inference_steps=25)
    assert config.modulation_timestep == PRESETS["reference"]["modulation_timestep"] != EmerDiffConfig().modulation_timestep


@pytest.mark.parametrize("old,new,value", [("--k", "num_clusters", "6"), ("-K", "num_clusters", "6"),
                                           ("--steps", "num_inference_steps", "20"),
                                           ("--strength", "modulation_strength", "3")])
def test_deprecated_flag_names_warn_and_still_work(old, new, value):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated.*--{new.replace('_', '-')}"):
        config = cli_config("segment", "tiny", old, value)
    assert getattr(config, new) == type(getattr(config, new))(value) != PRESETS["tiny"].get(new, -1)


def test_the_new_flag_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli_config("segment", "tiny", "--num-clusters", "6", "--num-inference-steps", "20", "--modulation-strength", "3")


def test_notebook_K_is_a_deprecated_alias():
    from emerdiff.notebook.lab import study_config

    with pytest.warns(FutureWarning, match="num_clusters"):
        assert study_config("tiny", K=6).num_clusters == 6
    with pytest.raises(ValueError, match="unknown EmerDiffConfig field"):
        study_config("tiny", not_a_field=1)


def test_settings_line_names_what_applies():
    from emerdiff.cli.app import build_parser
    from emerdiff.cli.options import config_from_args, settings_line

    args = build_parser().parse_args(["segment", "x.png", "--model", "reference", "--num-clusters", "5",
                                      "--set", "lowres=diffseg"])
    config = config_from_args(args)
    line = settings_line(args, config)
    assert line.startswith("settings for model 'reference' (reference preset): ")
    for name, value in PRESETS["reference"].items():
        shown = f"{name}={getattr(config, name)}"
        assert shown in line and (shown + " (given)" in line) == (name == "num_clusters")
    assert "num_clusters=5 (given)" in line and "lowres=diffseg (given)" in line
    assert "seed" not in line  # not given, not in the preset


def test_figures_leaves_every_setting_to_the_notebooks_preset(tmp_path, monkeypatch):
    """`emerdiff figures` passes the model, not settings: each notebook's lab.setup applies the preset,
    so no size rule is repeated on the way; -p still overrides any parameter."""
    import papermill

    from emerdiff.cli import app as cli

    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "00_x.ipynb").write_text("{}")
    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, dst, parameters, **kw: seen.append(parameters))
    monkeypatch.setattr(cli, "jupyter_kernel", lambda preferred: "python3")
    assert cli.main(["figures", "--model", "tiny", "--notebooks", str(tmp_path / "nb"), "--out", str(tmp_path / "f"),
                     "--executed", str(tmp_path / "e"), "-p", "num_clusters", "6"]) == 0
    fields = {f.name for f in dataclasses.fields(EmerDiffConfig)}
    (params,) = seen
    assert params["model"] == "tiny" and params["num_clusters"] == 6
    assert set(params) & fields == {"num_clusters"}  # only what the user gave
