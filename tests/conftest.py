"""Shared fixtures: the embedded Gemma 3 270M is converted once per machine and loaded once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (first use converts the GGUF into the jaxpost cache)."""
    from jaxpost.models.loading import load_model

    return load_model("embedded:gemma3-270m", show_progress=False)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """``../shared/data/gsm8k`` beside the repository; tests skip when it is absent."""
    d = SHARED / "data" / "gsm8k"
    if not (d / "test.jsonl").is_file():
        pytest.skip(f"GSM8K data not found at {d} (expected ../shared/data/gsm8k beside the repo)")
    return d
