from pathlib import Path

import pytest
from pydantic import ValidationError

from medml.config import flatten, load_settings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    settings = load_settings(path)
    assert settings.preprocess.spatial_size
    assert len(settings.preprocess.fingerprint()) == 12


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    s = load_settings(CONFIGS[0], ["train.epochs=3", "preprocess.spatial_size=[8, 8, 8]"])
    assert s.train.epochs == 3
    assert s.preprocess.spatial_size == (8, 8, 8)


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match=r"unknown key train.epoch; valid keys of train: .*"
                       r"did you mean train.epochs\?"):  # fmt: skip
        load_settings(None, ["train.epoch=3"])  # typo
    with pytest.raises(ValidationError):
        load_settings(None, ["split.train=0.9"])  # fractions no longer sum to 1
    with pytest.raises(ValueError, match="key=value"):
        load_settings(None, ["train.epochs"])


def test_fingerprint_changes_with_the_chain():
    a = load_settings(None)
    b = load_settings(None, ["preprocess.window=[-1000, 400]"])
    assert a.preprocess.fingerprint() != b.preprocess.fingerprint()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_the_settings_import_neither_numpy_nor_the_layers_they_check_names_of():
    # every command loads the settings; checking a rule's name must not cost numpy (~45 ms)
    import subprocess
    import sys

    code = (
        "import sys; from medml.config import Settings; Settings(); "
        "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith('medml.fewshot.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['medml.fewshot.registry']"]
