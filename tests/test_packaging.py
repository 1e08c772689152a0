""".ci/check_dist.py, CI's check that the built wheel and sdist hold every package file.

CI builds the real archives (``python -m build``, which needs the network for its build
environment); here the check runs on small archives laid out as setuptools writes them.
"""

from __future__ import annotations

import importlib.util
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_dist", REPO / ".ci" / "check_dist.py")
check_dist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_dist)


def test_the_package_files_are_its_modules_and_assets():
    files = check_dist.package_files()
    assert {"jaxpost/__init__.py", "jaxpost/install.py",
            "jaxpost/assets/rubrics_demo.jsonl"} <= files
    assert not any("__pycache__" in f for f in files)


@pytest.fixture
def src(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "jaxpost" / "assets").mkdir(parents=True)
    (src / "jaxpost" / "__pycache__").mkdir()
    for name in ("__init__.py", "cli.py", "assets/rubrics.jsonl", "__pycache__/cli.py"):
        (src / "jaxpost" / name).write_text("")
    return src


def write_dist(dist: Path, wheel_files, sdist_files) -> None:
    dist.mkdir()
    with zipfile.ZipFile(dist / "jaxpost-0.1.0-py3-none-any.whl", "w") as wheel:
        for name in [*wheel_files, "jaxpost-0.1.0.dist-info/METADATA"]:
            wheel.writestr(name, "")
    with tarfile.open(dist / "jaxpost-0.1.0.tar.gz", "w:gz") as sdist:
        for name in [*sdist_files, "pyproject.toml"]:
            info = tarfile.TarInfo(f"jaxpost-0.1.0/{name}")
            sdist.addfile(info)


def test_complete_archives_pass(src, tmp_path):
    files = ["jaxpost/__init__.py", "jaxpost/cli.py", "jaxpost/assets/rubrics.jsonl"]
    write_dist(tmp_path / "dist", files, [f"src/{f}" for f in files])
    assert check_dist.missing(tmp_path / "dist", src) == {
        "jaxpost-0.1.0-py3-none-any.whl": [], "jaxpost-0.1.0.tar.gz": []}


def test_a_data_file_left_out_is_named(src, tmp_path):
    modules = ["jaxpost/__init__.py", "jaxpost/cli.py"]
    write_dist(tmp_path / "dist", modules,
               [f"src/{f}" for f in modules[:1] + ["jaxpost/assets/rubrics.jsonl"]])
    assert check_dist.missing(tmp_path / "dist", src) == {
        "jaxpost-0.1.0-py3-none-any.whl": ["jaxpost/assets/rubrics.jsonl"],
        "jaxpost-0.1.0.tar.gz": ["jaxpost/cli.py"]}


def test_a_dist_without_both_archives_is_refused(tmp_path):
    (tmp_path / "jaxpost-0.1.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="one wheel and one sdist"):
        check_dist.missing(tmp_path)
