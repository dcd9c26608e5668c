"""eval.py run for real: the same figures from a workdir's checkpoint and from its model.h5 alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("eval") / "run"
    result = command("train.py", "--workdir", str(folder), "--max-steps", "3", "--val-examples", "200")
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def reports(workdir, tmp_path_factory):
    """eval.py's JSON on 300 built test sequences, from the checkpoint and from model.h5."""
    out = {}
    sources = {"workdir": ["--workdir", str(workdir)], "weights": ["--weights", str(workdir / "model.h5")]}
    for name, source in sources.items():
        path = tmp_path_factory.mktemp("reports") / f"{name}.json"
        result = command("eval.py", *source, "--examples", "300", "--json", str(path))
        assert result.returncode == 0, result.stderr
        assert "sequence accuracy" in result.stdout and "length 5" in result.stdout
        out[name] = json.loads(path.read_text())
    return out


def test_checkpoint_and_model_h5_give_the_same_report(reports):
    a, b = reports["workdir"], reports["weights"]
    assert a["num_examples"] == 300 and len(a["per_position_accuracy"]) == 5 and len(a["confusion"]) == 11
    assert set(a["per_length_sequence_accuracy"]) == {"1", "2", "3", "4", "5"} and a["examples_per_s"] > 0
    for key in ("per_position_accuracy", "individual_accuracy", "digit_accuracy", "sequence_accuracy",
                "per_length_sequence_accuracy", "length_accuracy", "confusion"):  # fmt: skip
        assert a[key] == b[key], key


def test_an_exported_file_gives_the_built_set_report(workdir, reports, tmp_path):
    data = tmp_path / "test.npz"
    exported = command("-m", "pipeline.export", "--examples", "300", "--seed", "0", "--out", str(data))
    assert exported.returncode == 0, exported.stderr
    out = tmp_path / "report.json"
    result = command("eval.py", "--weights", str(workdir / "model.h5"), "--data", str(data), "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["confusion"] == reports["weights"]["confusion"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "missing.h5"], "does not exist"),
        (["--workdir", "tests"], "is not a training workdir"),
        ([], "one of the arguments --workdir --weights is required"),
    ],
)
def test_bad_inputs_get_one_line(args, message):
    result = command("eval.py", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
