"""The training CLI's checks before anything is written: the finished runs a run builds on
(--structure-from, --dense-from), the data, --resume with --overwrite, argparse errors; and that
the recorded config describes what trained (CPU, tiny WRN)."""

import json
import shutil
import urllib.error

import pytest
import torch

from blockdpr.data import download
from blockdpr.train import main, parse_configs
from tiny import TINY


def small(tiny_cifar):
    return [*TINY, "--data", str(tiny_cifar), "--train-subset", "40", "--test-subset", "20", "--epochs", "1"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_cifar):
    """Finished WRN-10-1 runs to build on: element DPR at sparsity 0.8, block-16 DPR, dense."""
    root = tmp_path_factory.mktemp("sources")
    flags = small(tiny_cifar)
    main([*flags, "--sparsity", "0.8", "--out", str(root / "dpr08")])
    main([*flags, "--granularity", "block", "--block-size", "16", "--out", str(root / "block16")])
    main([*flags, "--mode", "dense", "--out", str(root / "dense")])
    return root


def refused(argv, capsys) -> str:
    """Run the CLI expecting exit 2; its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("mode", ["reinit", "orig-init"])
def test_a_structure_run_takes_the_sparsity_of_its_source_and_records_it(mode, sources, tiny_cifar, tmp_path, capsys):
    source = sources / "dpr08"
    out = tmp_path / "r"
    capsys.readouterr()
    summary = main([*small(tiny_cifar), "--mode", mode, "--structure-from", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "--sparsity 0.8" in line]
    assert len(said) == 1 and str(source) in said[0], err
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity"] == 0.8 and summary["sparsity"] == 0.8
    assert config["parameters"]["sparse_tensor_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["nonzero_sparse_weights"] == json.loads((source / "summary.json").read_text())["nonzero_sparse_weights"]
    default = parse_configs([*small(tiny_cifar), "--mode", mode, "--structure-from", str(source)])[0]
    assert default.out.name == f"{mode}-element-s0.8-seed0", "the default directory names the sparsity that trains"


def test_a_sparsity_that_contradicts_the_structure_is_refused(sources, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "r"
    err = refused([*small(tiny_cifar), "--mode", "reinit", "--structure-from", str(sources / "dpr08"),
                   "--sparsity", "0.9", "--out", str(out)], capsys)
    line = next(line for line in err.splitlines() if "sparsity" in line)
    assert "0.8" in line and "0.9" in line
    assert not out.exists()


@pytest.mark.parametrize("source, flags, named", [
    ("dpr08", ["--width", "2"], ["width: the source has 1, this run 2"]),
    ("dpr08", ["--depth", "16"], ["depth: the source has 10, this run 16"]),
    ("dpr08", ["--granularity", "block", "--block-size", "16"], ["granularity: the source has 'element', this run 'block'"]),
    ("block16", [], ["granularity: the source has 'block', this run 'element'"]),
    ("block16", ["--granularity", "block", "--block-size", "32"], ["block_size: the source has 16, this run 32"]),
    ("dense", [], ["is a --mode dense run, not a --mode dpr run"]),
], ids=["width", "depth", "element-into-block", "block-into-element", "block-size", "dense-source"])
def test_a_structure_from_another_model_is_refused_naming_each_mismatch(source, flags, named, sources, tiny_cifar,
                                                                       tmp_path, capsys):
    out = tmp_path / "r"
    err = refused([*small(tiny_cifar), "--mode", "orig-init", "--structure-from", str(sources / source), *flags,
                   "--out", str(out)], capsys)
    for text in named:
        assert text in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == len(named) + 1, err  # + the heading
    assert not out.exists(), "nothing is written, not even an empty run directory"


def test_structure_masks_that_do_not_fit_the_model_are_named(sources, tiny_cifar, tmp_path, capsys):
    source = tmp_path / "tampered"
    shutil.copytree(sources / "dpr08", source)
    masks = torch.load(source / "final_masks.pt", weights_only=True)
    del masks["group1.0.conv1.weight"]
    masks["group2.0.conv1.weight"] = masks["group2.0.conv1.weight"][:, :8]
    torch.save(masks, source / "final_masks.pt")
    out = tmp_path / "r"
    err = refused([*small(tiny_cifar), "--mode", "reinit", "--structure-from", str(source), "--out", str(out)], capsys)
    assert "missing group1.0.conv1.weight" in err
    assert "group2.0.conv1.weight: the source has [32, 8, 3, 3], this run [32, 16, 3, 3]" in err
    assert not out.exists()


def test_a_dense_from_of_another_model_is_refused_before_writing(sources, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "r"
    gmp = [*small(tiny_cifar), "--mode", "gmp", "--gmp-steps", "1", "--gmp-interval", "1", "--out", str(out)]
    err = refused([*gmp, "--dense-from", str(sources / "dense"), "--width", "2"], capsys)
    assert "width: the source has 1, this run 2" in err
    err = refused([*gmp, "--dense-from", str(sources / "dpr08")], capsys)
    assert "is a --mode dpr run, not a --mode dense run" in err
    assert not out.exists()


def test_missing_data_is_two_lines_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    err = refused([*TINY, "--data", str(tmp_path / "nowhere.zip"), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and all(len(line) <= 160 for line in lines), err
    assert "nowhere.zip" in err and "--data" in err and "shared" not in err
    assert not out.exists()


def test_a_failed_download_leaves_nothing(tmp_path, capsys, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    out = tmp_path / "r"
    err = refused([*TINY, "--download", "--data", str(tmp_path / "data"), "--out", str(out)], capsys)
    assert "downloading" in err and "no route to host" in err
    assert not out.exists()


def test_resume_and_overwrite_together_are_refused(sources, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(sources / "dpr08", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    err = refused(["--out", str(run), "--resume", "--overwrite"], capsys)
    assert "--resume and --overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_without_config_says_what_is_missing(sources, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(sources / "dpr08", run)
    (run / "config.json").unlink()
    err = refused(["--out", str(run), "--resume"], capsys)
    assert "config.json" in err and "last.pt" in err
    assert "holds no resumable run" not in err


def test_a_parse_error_is_one_line_and_a_hint(capsys):
    for argv in (["--bogus"], ["--epochs", "x"], ["--mode", "nope"]):
        err = refused(argv, capsys)
        lines = err.strip().splitlines()
        assert len(lines) == 2, err
        assert lines[0].startswith("error: ") and "usage" not in err
        assert "python -m blockdpr.train --help" in lines[1]


def test_element_mode_records_no_block_size(sources):
    config = json.loads((sources / "dpr08" / "config.json").read_text())
    assert config["granularity"] == "element" and config["block_size"] is None
    block = json.loads((sources / "block16" / "config.json").read_text())
    assert block["block_size"] == 16
