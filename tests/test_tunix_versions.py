"""The Tunix and qwix versions jaxpost's patches were written for: checked, and refused otherwise."""

from __future__ import annotations

import tomllib
import types
from importlib import metadata
from pathlib import Path

import pytest

from jaxpost import fast_logits, tunix_adapter
from jaxpost.tunix_ext.lora import install_lora_matmul
from jaxpost.tunix_ext.rope import honour_rope_theta
from jaxpost.tunix_ext.safetensors import gemma3_weights
from jaxpost.tunix_ext.versions import (WRITTEN_FOR, check_version, check_versions,
                                        installed_version)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_written_for_the_versions_pyproject_pins():
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in dependencies if "==" in d)
    assert WRITTEN_FOR == {package: pins[package] for package in WRITTEN_FOR}


def test_installed_versions_pass():
    assert installed_version("google-tunix") == "0.1.7"
    assert installed_version("qwix") == "0.1.8"
    check_versions()
    check_versions({"google-tunix": "0.1.7", "qwix": "0.1.8"})


@pytest.mark.parametrize("package, other, wanted",
                         [("google-tunix", "0.1.8", "0.1.7"), ("google-tunix", "0.2.0", "0.1.7"),
                          ("qwix", "0.1.7", "0.1.8")])
def test_another_version_is_refused_naming_both_and_the_fix(package, other, wanted):
    with pytest.raises(RuntimeError) as refused:
        check_versions({package: other})
    message = str(refused.value)
    assert f"written for version {wanted}" in message
    assert f"{package} {other} is installed" in message
    assert f"pip install {package}=={wanted}" in message


def test_a_missing_package_is_refused():
    with pytest.raises(RuntimeError, match=r"qwix is not installed; .*pip install qwix==0\.1\.8"):
        check_version("qwix", None)
    assert installed_version("no-such-distribution-jaxpost") is None


def test_an_unknown_package_is_named():
    with pytest.raises(ValueError, match="'torch'.*allowed: \\['google-tunix', 'qwix'\\]"):
        check_version("torch", "2.5.0")


@pytest.mark.parametrize("install", [
    lambda: fast_logits.enable(object()),
    lambda: fast_logits.speed_up_sampler(object()),
    lambda: tunix_adapter.keep_frozen_weights_in_place(object()),
    lambda: tunix_adapter.build_cluster(actor=None, reference=None, tokenizer=None, mesh=None,
                                        optimizer=None, config=None, eos_ids=(),
                                        metric_backends=()),
    install_lora_matmul,
    lambda: next(gemma3_weights(None, iter(()))),
    lambda: honour_rope_theta(types.SimpleNamespace()),
], ids=["enable", "speed_up_sampler", "keep_frozen_weights_in_place", "build_cluster",
        "install_lora_matmul", "gemma3_weights", "honour_rope_theta"])
def test_installing_the_patches_refuses_another_tunix(install, monkeypatch):
    # The installed distribution's metadata, as another Tunix release would report it.
    tunix_metadata = metadata.version

    def version(package):
        return "0.1.8" if package == "google-tunix" else tunix_metadata(package)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(RuntimeError, match=r"written for version 0\.1\.7, but google-tunix "
                                           r"0\.1\.8 is installed"):
        install()
