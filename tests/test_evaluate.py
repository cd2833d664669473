"""`emerdiff evaluate`: resume, accelerate multi-process, CLI wiring, tiny end-to-end run.

Most tests inject a fake segmenter (colour quantisation on a 4x4 grid) so they
do not depend on the diffusion pipeline; the last one runs the real tiny model.
In-process tests inject it as ``segment_fn`` or with the ``fake_model`` fixture;
`accelerate launch` subprocesses run ``evaluate_with_fake.py`` (no hook in the product).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from emerdiff.cli.evaluate import build_parser, run
from emerdiff.evaluation.records import load_record, record_path

REPO = Path(__file__).resolve().parents[1]
PALETTE = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 230, 50]], dtype=np.float64)
GRID = 4


# --------------------------------------------------------------------------- fake segmenter
def fake_segment(image) -> SimpleNamespace:
    """Deterministic stand-in for EmerDiff.segment: palette quantisation on a 4x4 token grid."""
    img = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64)
    h, w = img.shape[:2]
    bh, bw = h // GRID, w // GRID
    tokens = img[: bh * GRID, : bw * GRID].reshape(GRID, bh, GRID, bw, 3).mean(axis=(1, 3))
    feats = np.concatenate([tokens.reshape(-1, 3) / 255.0, np.ones((GRID * GRID, 1))], axis=1)
    nearest_colour = np.argmin(((tokens[:, :, None, :] - PALETTE) ** 2).sum(-1), axis=-1)
    _, low = np.unique(nearest_colour, return_inverse=True)  # renumber 0..K'-1
    low = low.reshape(GRID, GRID)
    k = int(low.max()) + 1
    rows = np.minimum(np.arange(h) * GRID // h, GRID - 1)
    cols = np.minimum(np.arange(w) * GRID // w, GRID - 1)
    nearest = low[rows[:, None], cols[None, :]]
    shifted = np.roll(nearest, 3, axis=1)  # a deliberately worse "bilinear" baseline
    emb = np.stack([feats[low.reshape(-1) == m].mean(0) for m in range(k)])
    return SimpleNamespace(labels=nearest, lowres_labels=low, nearest_labels=nearest,
                           bilinear_labels=shifted, mask_embeddings=emb, query_features=feats,
                           locality=np.full(k, 0.75), config={"fake": True, "grid": GRID},
                           model="fake")


@pytest.fixture
def fake_model(monkeypatch):
    """`emerdiff evaluate` (any entry point in this process) segments with ``fake_segment``."""
    from emerdiff.evaluation import runner as evaluate_command

    monkeypatch.setattr(evaluate_command, "_default_segmenter",  # (model source, device) -> fn, config, model
                        lambda source, device: (fake_segment, {"fake": True}, None))


def make_folder(root: Path, n: int = 6, size: int = 64) -> Path:
    """Synthetic folder dataset: 4 palette classes on 16-px blocks, noise, an ignored strip."""
    rng = np.random.RandomState(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("red\ngreen\nblue\nyellow\n")
    for i in range(n):
        low = rng.randint(0, 4 if i % 2 else 3, size=(GRID, GRID))
        label = np.kron(low, np.ones((size // GRID, size // GRID), dtype=np.uint8)).astype(np.uint8)
        img = PALETTE[label] + rng.randn(size, size, 3) * 8
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i:02d}.png")
        label[:, :2] = 255
        Image.fromarray(label).save(root / "labels" / f"im{i:02d}.png")
    return root


def _args(data: Path, out: Path, *extra: str):
    # 100 resamples keep the tests quick; --bootstrap in extra overrides
    return build_parser().parse_args(["--data", str(data), "--out", str(out), "--quiet", "--bootstrap", "100",
                                      *extra])


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


# --------------------------------------------------------------------------- tests
def test_run_writes_results_with_fake(tmp_path):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert run(_args(data, out), segment_fn=fake_segment) == 0  # default: every protocol
    rows = _rows(out)
    protocols = ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean")
    assert [(r["protocol"], r["method"]) for r in rows] == [
        (p, m) for p in protocols for m in ("emerdiff", "nearest", "bilinear")]
    by = {(r["protocol"], r["method"]): r for r in rows}
    # masks coincide with the GT regions: every protocol recovers them exactly
    for p in protocols:
        assert by[(p, "emerdiff")]["miou"] == pytest.approx(100.0)
        assert by[(p, "nearest")]["miou"] == pytest.approx(100.0)
        assert by[(p, "bilinear")]["miou"] < 100.0
        assert by[(p, "emerdiff")]["locality"] == pytest.approx(0.75)
        assert by[(p, "nearest")]["locality"] is None
        assert by[(p, "bilinear")]["miou_lo"] <= by[(p, "bilinear")]["miou"] <= by[(p, "bilinear")]["miou_hi"]
        for m in ("emerdiff", "nearest"):  # 100 on every image: zero spread, so no (zero-width) interval
            assert by[(p, m)]["miou_lo"] is None and by[(p, m)]["miou_hi"] is None
            assert "zero spread" in by[(p, m)]["interval_note"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("protocol,method,miou,miou_lo,miou_hi,interval_note") and len(csv_lines) == 13
    payload = json.loads((out / "results.json").read_text())
    # paired intervals of every difference between methods
    assert payload["intervals"]["concept"]["emerdiff-bilinear"]["lo"] > 0
    same = payload["intervals"]["concept"]["emerdiff-nearest"]  # identical methods: the difference has no spread
    assert (same["value"], same["lo"], same["hi"]) == (0.0, None, None) and "zero spread" in same["note"]
    assert any(n.startswith("concept emerdiff-nearest: no interval") for n in payload["notes"])
    assert payload["config"]["bootstrap"]["resamples"] == 100
    assert payload["config"]["image_ids"] == [f"im{i:02d}" for i in range(6)]
    # per-class IoU with the dataset's class names, in results.json and per_class.csv
    concept = next(r for r in payload["protocols"] if r["protocol"] == "concept")
    assert list(concept["methods"]["bilinear"]["per_class_iou"]) == ["red", "green", "blue", "yellow"]
    per_class = (out / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "protocol,method,class_id,class,iou" and len(per_class) == 1 + 4 * 3 * 4
    assert "concept,bilinear,3,yellow," in (out / "per_class.csv").read_text()
    assert payload["config"]["segmentation_config"] == {"fake": True, "grid": GRID}
    assert payload["config"]["num_images"] == 6 and payload["config"]["layout"] == "folder"
    rec = load_record(record_path(out, "im00"))
    assert set(rec.counts) == {"emerdiff", "nearest", "bilinear"} and rec.lowres_gt.shape == (4, 4)
    with np.load(record_path(out, "im00")) as z:
        assert z["map_gt"].shape == (64, 64) and z["map_emerdiff"].shape == (64, 64)


def test_resume_after_interruption_gives_same_numbers(tmp_path):
    data = make_folder(tmp_path / "data")
    full = tmp_path / "full"
    run(_args(data, full, "--protocol", "all"), segment_fn=fake_segment)

    calls = []

    def dies_after_two(image):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(image)
        return fake_segment(image)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(_args(data, out, "--protocol", "all"), segment_fn=dies_after_two)
    assert len(list((out / "per_image").glob("*.npz"))) == 2
    assert not list((out / "per_image").glob(".*"))  # no temp files left behind
    assert not (out / "results.json").exists()

    seen = []

    def counting(image):
        seen.append(image)
        return fake_segment(image)

    assert run(_args(data, out, "--protocol", "all"), segment_fn=counting) == 0
    assert len(seen) == 4  # only the images not done before
    assert _rows(out) == _rows(full)
    assert (out / "results.csv").read_text() == (full / "results.csv").read_text()


def test_limit_and_changed_settings_are_refused(tmp_path):
    data = make_folder(tmp_path / "data", n=3)
    out = tmp_path / "out"
    run(_args(data, out, "--limit", "2"), segment_fn=fake_segment)
    assert _rows(out)[0]["num_images"] == 2
    # same cache, different dataset root -> refused rather than mixed
    other = make_folder(tmp_path / "other", n=3)
    with pytest.raises(ValueError, match="different run"):
        run(_args(other, out), segment_fn=fake_segment)


def test_cli_evaluate_subcommand(tmp_path, fake_model):
    cli = pytest.importorskip("emerdiff.cli.app")
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    rc = cli.main(["evaluate", "--data", str(data), "--out", str(out), "--protocol", "concept",
                   "--quiet"])
    assert rc == 0 and (out / "results.json").exists() and (out / "results.csv").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(data: Path, out: Path, cwd: Path, *extra: str, fake: bool = False) -> dict:
    """`accelerate launch` 2 processes of the evaluation (CPU: the torchrun-based launcher);
    ``fake``: with the fake segmenter (through the test launcher script). A free port, not
    accelerate's fixed default: two launches at once (the xdist workers of `make test`) would clash."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    target = [str(Path(__file__).with_name("evaluate_with_fake.py"))] if fake else ["-m", "emerdiff.cli.evaluate"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           *target, "--data", str(data), "--out", str(out),
           "--protocol", "all", "--quiet", "--bootstrap", "100", *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["num_processes"] == 2
    return payload


@pytest.mark.slow
def test_accelerate_two_processes_match_single_process(tmp_path):
    data = make_folder(tmp_path / "data", n=5)  # odd count: uneven shares
    single = tmp_path / "single"
    run(_args(data, single, "--protocol", "all"), segment_fn=fake_segment)
    multi = tmp_path / "multi"
    payload = _launch_two_processes(data, multi, tmp_path, fake=True)
    assert payload["rows"] == _rows(single)
    assert len(list((multi / "per_image").glob("*.npz"))) == 5


def test_end_to_end_tiny_model(tmp_path):
    """The tiny model through the whole engine: the per-image records agree with scoring the saved
    label maps directly, and the protocols' numbers are those of the records."""
    import torch

    from emerdiff.evaluation.metrics import confusion_matrix
    from emerdiff.evaluation.protocols import evaluate_records

    torch.set_num_threads(1)
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = _args(data, out, "--model", "tiny", "--resolution", "64", "--num-clusters", "3",
                 "--protocol", "all", "--device", "cpu")
    assert run(args) == 0
    payload = json.loads((out / "results.json").read_text())
    cfg = payload["config"]["segmentation_config"]
    assert cfg["num_clusters"] == 3 and cfg["resolution"] == 64
    records = []
    for image_id in payload["config"]["image_ids"]:
        record = load_record(record_path(out, image_id), image_id)
        records.append(record)
        with np.load(record_path(out, image_id)) as z:
            gt = z["map_gt"]
            for method in ("emerdiff", "nearest", "bilinear"):
                ids = z[f"map_{method}"]
                if ids.shape != gt.shape:  # the maps are stored at the model's size, scored at the GT's
                    from emerdiff.sd.images import resize_labels

                    ids = resize_labels(ids, gt.shape)
                direct = confusion_matrix(ids, gt, 4, num_pred=record.num_masks).T
                np.testing.assert_array_equal(record.counts[method], direct, err_msg=method)
        assert record.counts["emerdiff"].sum() == (gt != 255).sum()
    for result in payload["protocols"]:
        again = evaluate_records(records, result["protocol"], 4, payload["config"]["class_names"], seed=0)
        for method, res in result["methods"].items():
            assert res["miou"] == pytest.approx(again["methods"][method]["miou"], abs=1e-12)
            assert res["pixel_accuracy"] == pytest.approx(again["methods"][method]["pixel_accuracy"], abs=1e-12)
    assert payload["rows"][0]["locality"] is not None
    assert (out / "results.csv").read_text().count("\n") == 1 + len(payload["rows"]) == 1 + 4 * 5  # protocols x methods


def test_a_label_map_equal_to_the_ground_truth_scores_100(tmp_path):
    """A segmenter whose masks are the GT classes scores 100 under every protocol (all images of a
    class share one embedding, so the dataset k-means and the concepts recover the classes)."""
    from emerdiff.evaluation.runner import run_evaluation

    data = make_folder(tmp_path / "data", n=4)
    labels = {p.stem: np.asarray(Image.open(p)) for p in (data / "labels").glob("*.png")}
    images = {p.stem: p for p in (data / "images").glob("*.png")}

    def oracle(image):
        gt = labels[next(k for k, v in images.items() if str(v) == str(image))]
        low = gt[::16, ::16].astype(np.int64)
        low = np.where(low == 255, 0, low)
        feats = np.eye(4)[low.reshape(-1)]
        return SimpleNamespace(labels=np.where(gt == 255, 0, gt), nearest_labels=np.where(gt == 255, 0, gt),
                               bilinear_labels=np.where(gt == 255, 0, gt), lowres_labels=low,
                               mask_embeddings=np.eye(4), query_features=feats)

    payload = run_evaluation(data, oracle, None, tmp_path / "out", protocols=["all", "majority"], n_boot=0, quiet=True)
    assert {r["protocol"] for r in payload["rows"]} == {"per_image_hungarian", "dataset_hungarian", "concept",
                                                        "concept_token_mean", "majority"}
    for r in payload["rows"]:
        assert r["miou"] == pytest.approx(100.0) and r["pixel_accuracy"] == pytest.approx(100.0), r


@pytest.mark.slow
def test_accelerate_tiny_model_matches_single_process(tmp_path):
    import torch

    torch.set_num_threads(1)
    data = make_folder(tmp_path / "data", n=2)
    tiny = ("--model", "tiny", "--resolution", "64", "--num-clusters", "3", "--device", "cpu")
    single = tmp_path / "single"
    assert run(_args(data, single, "--protocol", "all", *tiny)) == 0
    payload = _launch_two_processes(data, tmp_path / "multi", tmp_path, *tiny)
    assert payload["rows"] == _rows(single)


def _record_arrays(out: Path, image_id: str) -> dict[str, np.ndarray]:
    with np.load(record_path(out, image_id)) as z:
        return {k: z[k] for k in z.files if k not in ("meta", "settings_sha256")}


def test_run_evaluation_is_the_command_line(tmp_path):
    """The config a command-line run recorded, given to run_evaluation, reproduces that run: the same
    rows, settings and per-image records (flags off the model's sizes, so a dropped field shows)."""
    import torch

    from emerdiff.cli.app import main
    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.runner import run_evaluation

    torch.set_num_threads(1)
    data = make_folder(tmp_path / "data", n=1)
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    assert main(["evaluate", "--data", str(data), "--out", str(cli_out), "--model", "tiny", "--device", "cpu",
                 "--quiet", "--bootstrap", "20", "--resolution", "64", "--num-clusters", "2", "--blur-sigma", "0.5",
                 "--seed", "1", "--set", "kmeans_n_init=1"]) == 0
    from_cli = json.loads((cli_out / "results.json").read_text())
    config = EmerDiffConfig.from_dict(from_cli["config"]["segmentation_config"])
    assert (config.resolution, config.num_clusters, config.blur_sigma, config.seed) == (64, 2, 0.5, 1)

    payload = run_evaluation(data, "tiny", config, py_out, n_boot=20, device="cpu", quiet=True)
    assert payload == json.loads((py_out / "results.json").read_text())
    assert payload["config"]["segmentation_config"] == config.to_dict()  # every field reached the segmenter
    assert payload["config"]["protocol_seed"] == 1  # the config's seed seeds the protocols, as --seed does
    assert payload["rows"] == from_cli["rows"] and payload["config"] == from_cli["config"]
    assert json.loads((py_out / "run.json").read_text()) == json.loads((cli_out / "run.json").read_text())
    ours, theirs = _record_arrays(py_out, "im00"), _record_arrays(cli_out, "im00")
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_run_evaluation_takes_objects_and_refuses_bad_arguments(tmp_path, fake_model):
    """A config object and Python arguments in, the results out; bad arguments are a ValueError naming
    them, before anything is written."""
    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.runner import run_evaluation

    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    config = EmerDiffConfig.for_model("tiny", num_clusters=3, modulation_strength=5.0, seed=2)
    payload = run_evaluation(data, "tiny", config, out, protocols="concept", n_boot=10, quiet=True,
                             bootstrap_seed=7, limit=1)
    method = json.loads((out / "run.json").read_text())["method_config"]
    assert (method["num_clusters"], method["modulation_strength"], method["seed"]) == (3, 5.0, 2)
    assert method["resolution"] == EmerDiffConfig.for_model("tiny").resolution
    assert payload["config"]["bootstrap"]["seed"] == 7 and payload["config"]["protocol_seed"] == 2
    assert payload["config"]["num_images"] == 1 and {r["protocol"] for r in payload["rows"]} == {"concept"}

    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="unknown protocol.*'bogus'"):
        run_evaluation(data, "tiny", config, fresh, protocols="bogus")
    with pytest.raises(ValueError, match="a model name needs a config"):
        run_evaluation(data, "tiny", None, fresh)
    with pytest.raises(ValueError, match="n_boot=-1"):
        run_evaluation(data, "tiny", config, fresh, n_boot=-1)
    with pytest.raises(TypeError, match="segmenter must be"):
        run_evaluation(data, 3, config, fresh)
    assert not fresh.exists()


def test_openvocab_protocol_with_unet_labeller(tmp_path):
    """Class names from the dataset's list: labeller alone and pooled in EmerDiff masks, cached per image."""
    import torch

    torch.set_num_threads(1)
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = _args(data, out, "--model", "tiny", "--resolution", "64", "--num-clusters", "3", "--protocol", "openvocab",
                 "--labeller", "unet", "--device", "cpu", "--set", "num_inference_steps=10",
                 "--set", "modulation_timestep=201")
    assert run(args) == 0
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["unet", "unet+emerdiff"]
    assert all(r["protocol"] == "openvocab" and 0 <= r["miou"] <= 100 for r in rows)
    assert len(list((out / "openvocab_unet").glob("*.npz"))) == 2
    # resuming recomputes nothing and gives the same numbers
    first = (out / "results.json").read_text()
    assert run(args) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(first)["rows"]


def test_bootstrap_zero_disables_intervals(tmp_path):
    data = make_folder(tmp_path / "data", n=3)
    out = tmp_path / "out"
    assert run(_args(data, out, "--protocol", "dataset_hungarian", "--bootstrap", "0"), segment_fn=fake_segment) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["intervals"] == {} and all(r["miou_lo"] is None for r in payload["rows"])
    assert {r["protocol"] for r in payload["rows"]} == {"dataset_hungarian"}
    with pytest.raises(ValueError, match="--bootstrap -1"):
        run(_args(data, out, "--bootstrap", "-1"), segment_fn=fake_segment)


def _with_extra_methods(image) -> SimpleNamespace:
    """The fake plus two more methods: 'halves' with masks of its own, 'refined' on the shared masks."""
    seg = fake_segment(image)
    h, w = seg.labels.shape
    halves = np.zeros((h, w), dtype=np.int64)
    halves[:, w // 2:] = 1
    tokens = seg.query_features.reshape(GRID, GRID, -1)
    emb = np.stack([tokens[:, : GRID // 2].mean((0, 1)), tokens[:, GRID // 2:].mean((0, 1))])
    seg.extra_methods = {"halves": {"labels": halves, "mask_embeddings": emb}}
    seg.extra_labels = {"refined": seg.labels}  # as Segmentation.extra_labels (e.g. "diffseg")
    return seg


def test_every_method_of_the_records_is_scored(tmp_path):
    data = make_folder(tmp_path / "data", n=3)
    out = tmp_path / "out"
    assert run(_args(data, out), segment_fn=_with_extra_methods) == 0
    methods = ("emerdiff", "nearest", "bilinear", "refined", "halves")
    by = {(r["protocol"], r["method"]): r for r in _rows(out)}
    for p in ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean"):
        for m in methods:
            assert (p, m) in by, (p, m)
        assert by[(p, "refined")]["miou"] == pytest.approx(by[(p, "emerdiff")]["miou"])
        assert by[(p, "halves")]["miou"] < by[(p, "emerdiff")]["miou"]
    rec = load_record(record_path(out, "im00"))
    assert rec.methods == methods and rec.embeddings("halves").shape == (2, 4)
    with np.load(record_path(out, "im00")) as z:
        assert z["map_halves"].shape == (64, 64)


# --------------------------------------------------------------------------- compare
def _worse_segment(image) -> SimpleNamespace:
    seg = fake_segment(image)
    seg.labels = np.roll(seg.labels, 6, axis=0)  # EmerDiff's map shifted: clearly worse
    return seg


def test_compare_prints_a_paired_table(tmp_path, capsys):
    from emerdiff.cli.app import main

    data = make_folder(tmp_path / "data", n=6)
    a, b = tmp_path / "a", tmp_path / "b"
    run(_args(data, a), segment_fn=fake_segment)
    run(_args(data, b, "--limit", "4"), segment_fn=_worse_segment)
    report = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--bootstrap", "200", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "4 shared images" in text and "2 image(s) only in A" in text
    line = next(l for l in text.splitlines() if l.startswith("concept ") and " emerdiff " in l)
    assert line.rstrip().endswith("*")  # A better than B with an interval above 0
    result = json.loads(report.read_text())
    rows = {(r["protocol"], r["method"]): r for r in result["rows"]}
    assert rows[("dataset_hungarian", "emerdiff")]["a-b"]["lo"] > 0
    same = rows[("concept", "nearest")]["a-b"]  # both runs' nearest labels agree on every image: no spread
    assert (same["value"], same["lo"], same["hi"]) == (0.0, None, None) and "zero spread" in same["note"]
    assert rows[("concept", "nearest")]["a"]["value"] == pytest.approx(100.0)
    # a run against itself on all its images: its own results.json values, zero differences
    assert main(["compare", str(a), str(a), "--bootstrap", "0", "--json", str(report)]) == 0
    own = {(r["protocol"], r["method"]): r["miou"] for r in _rows(a)}
    for row in json.loads(report.read_text())["rows"]:
        assert row["a"]["value"] == pytest.approx(own[(row["protocol"], row["method"])])
        assert row["a-b"]["value"] == 0.0


def test_compare_refuses_runs_that_cannot_be_paired(tmp_path, capsys):
    from emerdiff.cli.app import main

    data = make_folder(tmp_path / "data", n=2)
    a = tmp_path / "a"
    run(_args(data, a), segment_fn=fake_segment)
    # no shared images: the same pictures under other names
    other = make_folder(tmp_path / "other", n=2)
    for folder in ("images", "labels"):
        for f in (other / folder).iterdir():
            f.rename(f.with_name("x" + f.name))
    b = tmp_path / "b"
    run(_args(other, b), segment_fn=fake_segment)
    assert main(["compare", str(a), str(b)]) == 2
    assert "share no images" in capsys.readouterr().err
    # other classes
    renamed = make_folder(tmp_path / "renamed", n=2)
    (renamed / "classes.txt").write_text("r\ng\nb\ny\n")
    c = tmp_path / "c"
    run(_args(renamed, c), segment_fn=fake_segment)
    assert main(["compare", str(a), str(c)]) == 2
    assert "different datasets: class_names" in capsys.readouterr().err
    # same image ids, different labels
    relabelled = make_folder(tmp_path / "relabelled", n=2)
    label = np.asarray(Image.open(relabelled / "labels" / "im01.png")).copy()
    label[10:20, 10:20] = 0
    Image.fromarray(label).save(relabelled / "labels" / "im01.png")
    d = tmp_path / "d"
    run(_args(relabelled, d), segment_fn=fake_segment)
    assert main(["compare", str(a), str(d)]) == 2
    assert "different labels" in (err := capsys.readouterr().err) and "im01" in err
    # not a finished run
    assert main(["compare", str(a), str(tmp_path / "data")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_majority_oracle_protocol_on_request_only(tmp_path):
    """--protocol majority scores each method's masks with their own majority class: its pixel accuracy is the
    ceiling of every labelling of the same masks; `all` leaves the oracle out."""
    data = make_folder(tmp_path / "data")
    assert run(_args(data, tmp_path / "all"), segment_fn=fake_segment) == 0
    assert "majority" not in {r["protocol"] for r in _rows(tmp_path / "all")}
    assert run(_args(data, tmp_path / "all", "--protocol", "majority"), segment_fn=fake_segment) == 0
    rows = {r["method"]: r for r in _rows(tmp_path / "all") if r["protocol"] == "majority"}
    assert set(rows) == {"emerdiff", "nearest", "bilinear"}
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert set(results["intervals"]) == {"majority"}
    dataset_level = evaluate_records_of(tmp_path / "all", "dataset_hungarian")
    for m, row in rows.items():
        assert row["pixel_accuracy"] >= dataset_level[m]["pixel_accuracy"] - 1e-9
        assert results["intervals"]["majority"][m]["value"] == pytest.approx(row["miou"])


def evaluate_records_of(out: Path, protocol: str) -> dict:
    from emerdiff.evaluation.protocols import evaluate_records

    cfg = json.loads((out / "results.json").read_text())["config"]
    records = [load_record(record_path(out, i), i) for i in cfg["image_ids"]]
    return evaluate_records(records, protocol, len(cfg["class_names"]))["methods"]


def test_boundary_metrics_of_every_protocol_in_results_csv_and_the_printed_table(tmp_path, capsys):
    """Boundary IoU, boundary F and the trimap curve of each protocol's labelling (the oracle too), with
    paired intervals; the majority values are those of the saved maps labelled by hand."""
    from emerdiff.evaluation.boundary import BoundaryMetrics
    from emerdiff.evaluation.runner import run_evaluation

    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    payload = run_evaluation(data, fake_segment, None, out, protocols=["all", "majority"], n_boot=100)
    metrics = BoundaryMetrics()
    by = {(r["protocol"], r["method"]): r for r in payload["rows"]}
    for p in ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean", "majority"):
        # the fake's EmerDiff map is the GT's blocks: perfect boundaries; its "bilinear" is shifted 3 px
        for name in metrics.names:
            assert by[(p, "emerdiff")][name] == pytest.approx(100.0), (p, name)
        assert by[(p, "bilinear")]["boundary_iou"] < 60.0 and by[(p, "bilinear")]["boundary_f"] < 80.0
        ci = payload["boundary_intervals"][p]["boundary_iou"]["emerdiff-bilinear"]
        assert ci["lo"] > 0 and ci["lo"] <= ci["value"] <= ci["hi"]
        assert by[(p, "bilinear")]["boundary_f_lo"] <= by[(p, "bilinear")]["boundary_f"]
    counts = 0
    for image_id in payload["config"]["image_ids"]:
        rec = load_record(record_path(out, image_id), image_id)
        with np.load(record_path(out, image_id)) as z:
            counts = counts + metrics.counts(rec.counts["bilinear"].argmax(axis=1)[z["map_bilinear"]], z["map_gt"], 4)
    for name, value in metrics.scores(counts).items():
        assert by[("majority", "bilinear")][name] == pytest.approx(value), name
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"boundary_iou", "boundary_iou_lo", "boundary_f_hi", "trimap_iou_16"} <= set(header)
    assert payload["config"]["boundary"]["trimap_widths_px"] == [1, 2, 4, 8, 16]
    printed = capsys.readouterr().err
    assert "boundary metrics" in printed and any(
        line.split()[:3] == ["majority", "bilinear", "bIoU"] for line in printed.splitlines())


def test_run_signature_ignores_later_fields_at_their_default(tmp_path):
    """A run cached before kmeans_backend / readout_filter existed resumes when they are at their defaults;
    another value is a different run."""
    from types import SimpleNamespace

    from emerdiff import EmerDiffConfig
    from emerdiff.config import LATER_FIELDS
    from emerdiff.evaluation.signature import run_signature

    data = SimpleNamespace(root=tmp_path, name="folder", split=None, ignore_index=255, num_classes=3)
    new = EmerDiffConfig().to_dict()
    assert set(LATER_FIELDS) <= set(new)
    old = {k: v for k, v in new.items() if k not in LATER_FIELDS}
    assert run_signature(data, "tiny", new) == run_signature(data, "tiny", old)
    for key, other in (("readout_filter", "guided_filter"), ("kmeans_backend", "torch")):
        assert run_signature(data, "tiny", {**new, key: other}) != run_signature(data, "tiny", old), key
