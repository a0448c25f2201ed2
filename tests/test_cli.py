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
    subprocess.run(
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
