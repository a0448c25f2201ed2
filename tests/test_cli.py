import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medml.cli import app

COMMANDS = ["synth", "ingest", "train", "evaluate", "prototypes", "predict", "pipeline"]
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
