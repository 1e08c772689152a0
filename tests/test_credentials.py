"""Credentials: lookup order over real source adapters with fake stores, masking, messages."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
import types

import pytest
import yaml

from jaxpost.runtime.credentials import (
    MASK,
    Credentials,
    Secret,
    SecretSources,
    check_model_access,
    missing_secret_message,
    redact,
    resolve_credentials,
)

GATED = "kaggle:google/gemma-3/flax/gemma3-1b-it"


class _ColabMissing(Exception):
    pass


class _ColabNoAccess(Exception):
    pass


def fake_colab(secrets: dict[str, str], no_access: tuple[str, ...] = ()):
    """A stand-in for ``google.colab.userdata``: raises, as Colab does, for absent secrets."""

    def get(name):
        if name in no_access:
            raise _ColabNoAccess(name)
        if name not in secrets:
            raise _ColabMissing(name)
        return secrets[name]

    # Colab's exception classes are looked up by these names on the module.
    return types.SimpleNamespace(get=get, SecretNotFoundError=_ColabMissing,
                                 NotebookAccessError=_ColabNoAccess)


class _KaggleBackendError(Exception):
    pass


class _KaggleCredentialError(Exception):
    pass


def fake_kaggle(secrets: dict[str, str], enabled: bool = True, calls: list | None = None):
    """A stand-in for the ``kaggle_secrets`` module (``UserSecretsClient``, its errors)."""

    class UserSecretsClient:
        def __init__(self):
            if not enabled:  # the Secrets add-on is off: no token for the client
                raise _KaggleCredentialError("no JWT token")

        def get_secret(self, label):
            if calls is not None:
                calls.append(label)
            if label not in secrets:
                raise _KaggleBackendError("Unexpected response from the service.")
            return secrets[label]

    return types.SimpleNamespace(UserSecretsClient=UserSecretsClient,
                                 BackendError=_KaggleBackendError,
                                 CredentialError=_KaggleCredentialError)


def _values(creds: Credentials) -> dict[str, str | None]:
    return {k: (v.reveal() if v else None) for k, v in creds.by_name().items()}


def test_order_explicit_then_colab_then_kaggle_then_environment():
    every = {"HF_TOKEN": "x", "KAGGLE_USERNAME": "x", "KAGGLE_KEY": "x"}
    sources = SecretSources(
        colab=fake_colab({"HF_TOKEN": "hf-colab", "KAGGLE_USERNAME": "user-colab"}),
        kaggle=fake_kaggle({"HF_TOKEN": "hf-kaggle", "KAGGLE_USERNAME": "user-kaggle",
                            "KAGGLE_KEY": "key-kaggle"}),
        environ={k: f"{k.lower()}-env" for k in every})
    creds = resolve_credentials(hf_token="hf-explicit", sources=sources)
    assert _values(creds) == {"HF_TOKEN": "hf-explicit", "KAGGLE_USERNAME": "user-colab",
                              "KAGGLE_KEY": "key-kaggle"}
    assert dict(creds.origins) == {"HF_TOKEN": "explicit", "KAGGLE_USERNAME": "colab",
                                   "KAGGLE_KEY": "kaggle"}

    # Take the earlier stores away one at a time: each next store answers.
    no_colab = resolve_credentials(sources=SecretSources(kaggle=sources.kaggle,
                                                         environ=sources.environ))
    assert _values(no_colab) == {"HF_TOKEN": "hf-kaggle", "KAGGLE_USERNAME": "user-kaggle",
                                 "KAGGLE_KEY": "key-kaggle"}
    only_env = resolve_credentials(sources=SecretSources(environ=sources.environ))
    assert _values(only_env) == {"HF_TOKEN": "hf_token-env",
                                 "KAGGLE_USERNAME": "kaggle_username-env",
                                 "KAGGLE_KEY": "kaggle_key-env"}
    assert set(only_env.origins.values()) == {"environment"}


def test_empty_values_count_as_absent_and_nothing_found_is_none():
    sources = SecretSources(colab=fake_colab({"HF_TOKEN": "  "}),
                            kaggle=fake_kaggle({"HF_TOKEN": ""}),
                            environ={"HF_TOKEN": "hf-env", "KAGGLE_KEY": ""})
    creds = resolve_credentials(hf_token="", sources=sources)
    assert _values(creds) == {"HF_TOKEN": "hf-env", "KAGGLE_USERNAME": None, "KAGGLE_KEY": None}
    assert not creds.has_kaggle


def test_colab_secret_without_notebook_access_is_skipped_and_noted():
    sources = SecretSources(colab=fake_colab({}, no_access=("HF_TOKEN",)),
                            environ={"HF_TOKEN": "hf-env"})
    creds = resolve_credentials(sources=sources)
    assert creds.hf_token.reveal() == "hf-env"
    assert len(creds.notes) == 1
    assert "HF_TOKEN" in creds.notes[0] and "Notebook access" in creds.notes[0]


def test_kaggle_store_switched_off_is_asked_once_then_skipped():
    creds = resolve_credentials(sources=SecretSources(kaggle=fake_kaggle({}, enabled=False),
                                                      environ={"KAGGLE_KEY": "key-env"}))
    assert creds.kaggle_key.reveal() == "key-env"
    assert creds.notes == ("Kaggle secrets are unavailable (_KaggleCredentialError)",)

    calls = []
    resolve_credentials(sources=SecretSources(kaggle=fake_kaggle({}, calls=calls), environ={}))
    assert calls == ["HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"]


def test_an_unexpected_store_error_is_not_swallowed():
    def broken(name):
        raise RuntimeError("store is broken")

    with pytest.raises(RuntimeError, match="store is broken"):
        resolve_credentials(sources=SecretSources(colab=types.SimpleNamespace(get=broken)))


def test_detect_reads_the_real_modules_when_present(monkeypatch):
    import sys

    colab = fake_colab({"HF_TOKEN": "hf-from-colab-module"})
    # A loaded "google.colab" is found in sys.modules without importing its parent.
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(userdata=colab))
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)  # import raises ImportError
    monkeypatch.delenv("HF_TOKEN", raising=False)
    detected = SecretSources.detect()
    assert detected.colab is colab and detected.kaggle is None
    assert resolve_credentials().hf_token.reveal() == "hf-from-colab-module"


def test_secret_never_shows_itself():
    s = Secret("hf_supersecret")
    for shown in (str(s), repr(s), f"{s}", f"{s!r}", f"{s:>40}", "%s" % s, str([s]),
                  str({"k": s})):
        assert "hf_supersecret" not in shown
    assert MASK in str(s)
    assert s.reveal() == "hf_supersecret"
    for dump in (pickle.dumps, json.dumps, yaml.safe_dump):
        with pytest.raises((TypeError, yaml.representer.RepresenterError)):
            dump(s)
    with pytest.raises(ValueError):
        Secret("")
    creds = Credentials(hf_token=s, origins={"HF_TOKEN": "explicit"})
    assert copy.deepcopy(creds).hf_token.reveal() == "hf_supersecret"
    assert "hf_supersecret" not in str(dataclasses.asdict(creds))


def test_credentials_repr_masks_and_says_where_each_came_from(caplog):
    creds = resolve_credentials("hf_supersecret", sources=SecretSources(
        environ={"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "kagglesecret"}))
    text = repr(creds)
    assert text == ("Credentials(HF_TOKEN=set (explicit), KAGGLE_USERNAME=set (environment), "
                    "KAGGLE_KEY=set (environment))")
    assert str(creds) == text and f"{creds}" == text
    logging.getLogger("jaxpost.test").warning("creds: %s %r", creds, creds.hf_token)
    assert "hf_supersecret" not in caplog.text and "kagglesecret" not in caplog.text
    assert repr(Credentials()) == ("Credentials(HF_TOKEN=not set, KAGGLE_USERNAME=not set, "
                                   "KAGGLE_KEY=not set)")


def test_apply_to_environment_is_how_the_hub_clients_see_them(monkeypatch):
    for name in ("HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)  # recorded, so the test's writes are undone after it
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", "/nonexistent-jaxpost-test")
    creds = resolve_credentials("hf_tok123", "someone", "kagglesecret",
                                sources=SecretSources(environ={}))
    fake_env: dict[str, str] = {}
    assert creds.apply_to_environment(fake_env) == ["HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"]
    assert fake_env == {"HF_TOKEN": "hf_tok123", "KAGGLE_USERNAME": "someone",
                        "KAGGLE_KEY": "kagglesecret"}

    creds.apply_to_environment()
    import huggingface_hub
    import kagglehub.config

    assert huggingface_hub.get_token() == "hf_tok123"
    kaggle = kagglehub.config.get_kaggle_credentials()
    assert (kaggle.username, kaggle.key) == ("someone", "kagglesecret")


def test_apply_to_environment_prints_nothing(capfd):
    resolve_credentials("hf_tok123", sources=SecretSources(environ={})).apply_to_environment({})
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_redact_hides_known_secrets_longest_first(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    monkeypatch.setenv("KAGGLE_KEY", "hf_abcdef")
    assert redact("url?token=hf_abcdef&x=hf_abc") == f"url?token={MASK}&x={MASK}"
    assert redact("nothing here", []) == "nothing here"
    creds = resolve_credentials("hf_zzz", sources=SecretSources(environ={}))
    assert creds.redact("Bearer hf_zzz") == f"Bearer {MASK}"


def test_cli_error_output_is_redacted(monkeypatch, capsys):
    """An error quoting the token (as a hub client's might) prints it masked."""
    from jaxpost import cli
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETclierror")

    def failing(args):
        raise PermissionError("request with Authorization: Bearer hf_SECRETclierror refused")

    monkeypatch.setattr(cli, "_cmd_export", failing)
    assert cli.main(["export", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert "hf_SECRETclierror" not in err and f"Bearer {MASK} refused" in err


def test_gated_kaggle_model_without_credentials_names_the_secrets_and_where(tmp_path):
    env = {"KAGGLE_CONFIG_DIR": str(tmp_path / "no-kaggle-dir"),
           "KAGGLEHUB_CACHE": str(tmp_path / "no-cache")}
    with pytest.raises(PermissionError) as e:
        check_model_access(GATED, Credentials(), environ=env)
    message = str(e.value)
    for needed in ("KAGGLE_USERNAME", "KAGGLE_KEY", "key icon", "Add-ons > Secrets",
                   "kaggle.com/models/google/gemma-3"):
        assert needed in message, needed


@pytest.mark.parametrize("case", ["credentials", "kaggle notebook", "kaggle.json", "cached",
                                  "not gated"])
def test_gated_check_passes_when_access_is_possible(tmp_path, case):
    env = {"KAGGLE_CONFIG_DIR": str(tmp_path / "kaggle"), "KAGGLEHUB_CACHE": str(tmp_path / "c")}
    creds, model = Credentials(), GATED
    if case == "credentials":
        creds = resolve_credentials(kaggle_username="u", kaggle_key="k",
                                    sources=SecretSources(environ={}))
    elif case == "kaggle notebook":
        env["KAGGLE_KERNEL_RUN_TYPE"] = "Interactive"
    elif case == "kaggle.json":
        (tmp_path / "kaggle").mkdir()
        (tmp_path / "kaggle" / "kaggle.json").write_text("{}")
    elif case == "cached":
        (tmp_path / "c" / "models" / GATED.split(":", 1)[1]).mkdir(parents=True)
    else:
        model = "embedded:gemma3-270m"
    check_model_access(model, creds, environ=env)


def test_prepare_session_refuses_a_gated_model_before_loading(monkeypatch, tmp_path):
    from jaxpost import session as session_lib
    from jaxpost.config import get_preset

    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(session_lib, "load_model", lambda *a, **k: pytest.fail("loaded"))
    config = dataclasses.replace(get_preset("smoke"), model=GATED)
    empty = resolve_credentials(sources=SecretSources(environ={}))
    with pytest.raises(PermissionError, match="KAGGLE_USERNAME and KAGGLE_KEY"):
        session_lib.prepare_session(config, credentials=empty)


def test_missing_secret_message_grammar():
    one = missing_secret_message("repo 'x'", ["HF_TOKEN"])
    assert one.startswith("repo 'x' needs the secret HF_TOKEN. Add it: Colab: click the key icon")
    two = missing_secret_message("m", ["KAGGLE_USERNAME", "KAGGLE_KEY"])
    assert "needs the secrets KAGGLE_USERNAME and KAGGLE_KEY. Add them:" in two
