"""Checks a built jaxpost wheel and sdist: one of each, holding every module and data file.

    python .ci/check_dist.py DIST_DIR

The package's files are what src/jaxpost holds: its modules (``*.py``) and the data
files that pyproject.toml's package-data names (``assets/*.jsonl``). A file left out of
the wheel works in an editable install and fails only for users of the wheel, which is
why CI looks. Exits 1 naming each missing file, else prints what each archive holds.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SHIPPED = ("*.py", "assets/*.jsonl")


def package_files(src: Path = SRC) -> set[str]:
    """The package's files as archive paths relative to ``src`` (``jaxpost/install.py``)."""
    return {path.relative_to(src).as_posix() for pattern in SHIPPED
            for path in (src / "jaxpost").rglob(pattern) if "__pycache__" not in path.parts}


def archive_names(archive: Path) -> set[str]:
    """Paths inside a wheel, or inside an sdist less its top folder and ``src/``."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return set(wheel.namelist())
    with tarfile.open(archive) as sdist:
        return {name.split("/", 1)[1].removeprefix("src/") for name in sdist.getnames()
                if "/" in name}


def missing(dist: Path, src: Path = SRC) -> dict[str, list[str]]:
    """Archive name -> the package files it lacks, for the one wheel and one sdist in ``dist``.

    Raises:
      ValueError: ``dist`` does not hold exactly one wheel and one sdist.
    """
    archives = sorted(dist.glob("*.whl")) + sorted(dist.glob("*.tar.gz"))
    if [a.suffix for a in archives] != [".whl", ".gz"]:
        raise ValueError(f"{dist}: expected one wheel and one sdist, found "
                         f"{[a.name for a in archives]}")
    expected = package_files(src)
    return {a.name: sorted(expected - archive_names(a)) for a in archives}


def main(argv: list[str]) -> int:
    dist = Path(argv[1])
    lacking = missing(dist)
    for name, files in lacking.items():
        if files:
            print(f"{name} lacks {', '.join(files)}", file=sys.stderr)
        else:
            data = sorted(f for f in package_files() if not f.endswith(".py"))
            print(f"{name}: all {len(package_files())} package files, among them "
                  f"{', '.join(data)}")
    return 1 if any(lacking.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
