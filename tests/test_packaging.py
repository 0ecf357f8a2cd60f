"""The wheel ships every package (the explicit list in pyproject.toml) and conf/ as `sftjax.conf`; the console
scripts start without importing JAX; `import sftjax` exposes its API lazily; the README stays a front door."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

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


def test_the_top_level_api_loads_lazily_and_whole():
    import sftjax

    for name in sftjax.__all__:
        assert getattr(sftjax, name) is not None, name
    assert set(sftjax.__all__) <= set(dir(sftjax))
    assert sftjax.merge_lora.__module__ == "sftjax.peft.lora"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sftjax.nope  # noqa: B018


def test_console_scripts_start_without_jax():
    """The entry points may re-run their process (sftjax/cli/malloc.py) before importing JAX; `import sftjax` and
    the launcher import neither JAX nor the command modules."""
    code = ("import sys, sftjax, sftjax.cli.launch; "
            "print(sorted(m for m in ('jax', 'sftjax.cli.eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("sftjax-train", "sftjax-eval", "sftjax-generate"):
        assert scripts[name].startswith("sftjax.cli.launch:"), name


def test_the_readme_stays_short_and_its_first_screen_has_the_two_commands():
    """Under 300 lines of at most 120 characters; its first lines install and run the main job and the tests,
    with the command .ci/run runs."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300
    assert [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    first = "\n".join(lines[:12])
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert "pip install . && sftjax-train" in first
    assert 'pip install -e ".[test]" && python -m pytest -q' in first and ci.endswith(
        'pip install -e ".[test]" && python -m pytest -q')
