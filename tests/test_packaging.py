"""The wheel ships every package (the explicit list in pyproject.toml) and conf/ as `sftjax.conf`."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_package_list_is_complete():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sftjax").rglob("__init__.py")}
    assert found | {"sftjax.conf"} == listed


def test_wheel_contains_the_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("sftjax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sftjax/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected <= names and "sftjax/conf/config.yaml" in names
    assert "sftjax/model/transformer.py" in names
