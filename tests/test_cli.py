import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medml.cli import app

COMMANDS = [
    "synth", "ingest", "import-medmnist", "train", "pretrain", "sweep", "evaluate", "prototypes",
    "predict", "promote", "pipeline", "serve",
]  # fmt: skip
runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in result.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    result = runner.invoke(app, [cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_unusable_arguments_exit_2(tmp_path):
    assert runner.invoke(app, ["ingest", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(app, ["train", "--set", "train.epochz=1"]).exit_code == 2


def test_synth_then_ingest_from_the_console_script(tmp_path):
    env_cmd = [sys.executable, "-m", "medml.cli"]
    out = tmp_path / "raw"
    synth = subprocess.run(
        [
            *env_cmd,
            "synth",
            "covid-ct",
            "--out",
            str(out),
            "--n-patients",
            "2",
            "--set",
            "synth.matrix=24",
            "--set",
            "synth.z_extent_mm=96",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    done = subprocess.run(
        [
            *env_cmd,
            "ingest",
            str(out),
            "--labels",
            str(out / "labels.csv"),
            "--workspace",
            str(tmp_path / "ws"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    n_studies = len((out / "labels.csv").read_text().strip().splitlines()) - 1
    assert f"ingested into {n_studies} scans" in done.stdout
    assert list((tmp_path / "ws" / "reports").glob("ingest-*.json"))
    # off a terminal, progress is log lines: no bar redrawn with carriage returns (text mode
    # reads those as newlines, so look for the bar itself)
    for output in (synth.stderr, done.stderr, done.stdout):
        assert "%|" not in output and "it/s]" not in output
    assert "synth: 2/2 patient (100 %)" in synth.stderr
    assert "convert: " in done.stderr


def test_synth_options_left_out_do_not_override_config(tmp_path):
    """`--set synth.n_patients=2` used to give 60 patients: the command's own defaults won."""
    out = tmp_path / "raw"
    small = ["--set", "synth.matrix=16", "--set", "synth.z_extent_mm=64"]
    args = ["synth", "covid-ct", "--out", str(out), "--set", "synth.n_patients=2", *small]
    result = runner.invoke(app, [*args, "--set", "synth.format=nifti"])
    assert result.exit_code == 0, result.output
    assert "of 2 patients" in result.output
    assert not list(out.rglob("*.dcm"))  # synth.format=nifti was kept too
    result = runner.invoke(app, [*args, "--n-patients", "1"])  # an explicit option still wins
    assert result.exit_code == 0, result.output
    assert "of 1 patients" in result.output


def test_pipeline_summary_prints_undefined_metrics_as_na(tmp_path, capsys):
    """A test split too small for retrieval gives NaN metrics (null after the flow's JSON);
    the summary says n/a instead of crashing after every step has run."""
    from medml.cli import _print_summary
    from medml.workspace import Workspace

    metrics = {"run_id": "r1", "precision_at_1": None, "r_precision": float("nan"),
               "mean_average_precision_at_r": 0.5, "accuracy": 0.25, "balanced_accuracy": None,
               "auroc": None, "fewshot": None}  # fmt: skip
    result = {
        "train": {"metrics": metrics},
        "ingest": {"report": "r.json", "scans": 3},
        "champion_uri": "models:/m@champion",
        "champion": {"version": "1"},
        "predict": {"predictions": "p.csv", "n": 3, "errors": 0, "accuracy_vs_labels": None},
    }
    _print_summary(result, Workspace(tmp_path / "ws"))
    out = capsys.readouterr().out
    assert "P@1 n/a  R-precision n/a  MAP@R 0.500" in out
    assert "nearest-centroid accuracy 0.250  balanced n/a  AUROC n/a" in out
    assert "accuracy vs labels n/a" in out


def test_an_empty_ingest_imports_no_dicom_or_nifti_library(tmp_path):
    """Start-up: a command imports what its work needs. An empty folder needs neither pydicom
    (which brings requests) nor nibabel; a DICOM file would load them on first use."""
    (tmp_path / "empty").mkdir()
    args = ["ingest", str(tmp_path / "empty"), "--workspace", str(tmp_path / "ws")]
    code = (
        "import sys\n"
        "from medml.cli import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = ('pydicom', 'nibabel', 'requests', 'torch', 'monai', 'scipy')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
