import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mixres.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_list_prints_a_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["kind", "name", "what"]
    rows = {tuple(line.split()[:2]) for line in out[2:]}
    assert {("fusion", "mr_adapter"), ("fusion", "mr_final"), ("projector", "mlp2x_gelu")} <= rows


def test_list_one_kind_with_pattern(capsys):
    assert main(["list", "fusion", "--pattern", "mr_f*"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[:2] for r in rows] == [["fusion", "mr_final"]]


def test_wheel_installs_into_a_fresh_venv(tmp_path):
    """Build the wheel (not editable), install it into a fresh venv, run `mixres list`.

    The fresh venv borrows torch & co. from this interpreter's site-packages through a .pth
    file, so the test checks what the wheel ships without re-downloading 6 GB of torch.
    """
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("mixres-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import mixres; print(mixres.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where  # the wheel's copy, not the source tree
    out = subprocess.run([str(venv / "bin" / "mixres"), "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "mr_adapter" in out
    code = ("import mixres.integrations, mixres.integrations.hf, mixres.integrations.llava; "
            "from mixres.integrations.hf import mrify; from mixres.integrations.llava import generate_dataset; "
            "print(mixres.integrations.__file__)")
    res = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert str(venv) in res.stdout


def test_unknown_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_pyproject_lists_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mixres").rglob("__init__.py")}
    found |= {"mixres." + ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "integrations").rglob("__init__.py")}
    data = {"mixres.integrations.llava.recipes", "mixres.integrations.llava.deepspeed"}  # data-only folders
    assert found | data == listed


def test_the_build_prints_no_setuptools_warning(tmp_path):
    """A newcomer's `pip install` shows no wall of warnings: the wheel build itself is warning-free."""
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path)!r})"
    res = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    noisy = [line for line in (res.stdout + res.stderr).splitlines()
             if "Warning" in line or "deprecated" in line.lower() or "!!" in line]
    assert not noisy, "\n".join(noisy[:10])
    wheel = next(tmp_path.glob("mixres-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "mixres/integrations/llava/recipes/tiny-stage2.json" in names
    assert any(n.startswith("mixres/integrations/llava/deepspeed/") for n in names)
