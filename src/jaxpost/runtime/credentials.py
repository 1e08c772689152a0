"""Hub credentials: found in one fixed order, held masked, handed to the hub clients.

Three secrets matter to jaxpost: ``HF_TOKEN`` (Hugging Face Hub) and ``KAGGLE_USERNAME``
/ ``KAGGLE_KEY`` (Kaggle Models). :func:`resolve_credentials` looks each one up in this
order and keeps the first non-empty value:

1. an explicit value passed to it (allowed; never echoed);
2. Colab's secrets (``google.colab.userdata``: the key icon in the left sidebar);
3. Kaggle's secrets (``kaggle_secrets.UserSecretsClient``: Add-ons > Secrets);
4. the environment variable of the same name.

A secret is held as a :class:`Secret`, whose ``str``, ``repr`` and format spec all print
``***``; its value comes out only through :meth:`Secret.reveal`, which jaxpost calls only
to export it (:meth:`Credentials.apply_to_environment`, how huggingface_hub and kagglehub
read them) and to mask it in text (:meth:`Credentials.redact`). So a credential printed,
logged or put into an f-string shows as masked, and a config never holds one (see
``jaxpost.config``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

HF_TOKEN = "HF_TOKEN"
KAGGLE_USERNAME = "KAGGLE_USERNAME"
KAGGLE_KEY = "KAGGLE_KEY"
SECRET_NAMES = (HF_TOKEN, KAGGLE_USERNAME, KAGGLE_KEY)
# The values that grant access; a Kaggle username is public and too common a word to
# scrub from text, though it is masked like the others when a Credentials is printed.
REDACTED_NAMES = (HF_TOKEN, KAGGLE_KEY)
# Where each lookup comes from, in lookup order.
SOURCE_ORDER = ("explicit", "colab", "kaggle", "environment")
MASK = "***"

WHERE_TO_ADD = (
    "Colab: click the key icon in the left sidebar, add the secret and switch on its "
    "'Notebook access'; Kaggle: Add-ons > Secrets, add it and tick it for this notebook; "
    "elsewhere: set the environment variable, or pass it to resolve_credentials(...)")

# Exception classes, by name, that each secret store raises for a secret that is absent
# or not shared with this notebook; looked up on the (real or fake) module.
_COLAB_MISSING = ("SecretNotFoundError", "NotebookAccessError", "TimeoutException")
_KAGGLE_MISSING = ("BackendError", "CredentialError")


class Secret:
    """A string that never shows itself: ``str``, ``repr`` and f-strings give ``***``.

    Pickling, YAML and JSON refuse it (it is not a ``str``), so it cannot end up in a
    saved config or checkpoint by accident.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not isinstance(value, str) or not value:
            raise ValueError("a Secret needs a non-empty string")
        self._value = value

    def reveal(self) -> str:
        """The secret itself; only for handing it to the library that needs it."""
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled (it would be written out in clear)")

    # Immutable, so a copy is the same object (and copying must not go through pickling).
    def __copy__(self) -> "Secret":
        return self

    def __deepcopy__(self, memo) -> "Secret":
        return self


@dataclasses.dataclass(frozen=True)
class SecretSources:
    """The secret stores :func:`resolve_credentials` consults after explicit values.

    Attributes:
      colab: ``google.colab.userdata`` (or a stand-in with ``get(name)`` and the same
        exception classes); None off Colab.
      kaggle: the ``kaggle_secrets`` module (or a stand-in with ``UserSecretsClient``);
        None off Kaggle.
      environ: the environment (default ``os.environ``).
    """

    colab: Any = None
    kaggle: Any = None
    environ: Mapping[str, str] | None = None

    @classmethod
    def detect(cls) -> "SecretSources":
        """The stores of the machine this runs on: Colab's and Kaggle's when importable."""
        try:
            # google.colab exists only inside Colab
            from google.colab import userdata as colab
        except ImportError:
            colab = None
        try:
            # kaggle_secrets exists only inside a Kaggle notebook
            import kaggle_secrets as kaggle
        except ImportError:
            kaggle = None
        return cls(colab=colab, kaggle=kaggle)


def _errors(module: Any, names: Iterable[str]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))


class _Lookup:
    """One pass over the sources; remembers, by name only, what could not be read."""

    def __init__(self, sources: SecretSources):
        self.sources = sources
        self.notes: list[str] = []
        self._kaggle_client = None
        self._kaggle_unavailable = sources.kaggle is None

    def colab(self, name: str) -> str | None:
        userdata = self.sources.colab
        if userdata is None:
            return None
        try:
            return userdata.get(name)
        except _errors(userdata, _COLAB_MISSING) as e:
            if isinstance(e, _errors(userdata, ("NotebookAccessError",))):
                self.notes.append(f"Colab secret {name} exists but this notebook may not read "
                                  "it: switch on its 'Notebook access' (key icon)")
            return None

    def kaggle(self, name: str) -> str | None:
        if self._kaggle_unavailable:
            return None
        module = self.sources.kaggle
        missing = _errors(module, _KAGGLE_MISSING) + (OSError,)
        try:
            if self._kaggle_client is None:
                self._kaggle_client = module.UserSecretsClient()
            return self._kaggle_client.get_secret(name)
        except missing as e:
            if self._kaggle_client is None:  # the store itself is off: ask it no more
                self._kaggle_unavailable = True
                self.notes.append(f"Kaggle secrets are unavailable ({type(e).__name__})")
            return None

    def environment(self, name: str) -> str | None:
        environ = os.environ if self.sources.environ is None else self.sources.environ
        return environ.get(name)


@dataclasses.dataclass(frozen=True, repr=False)
class Credentials:
    """Hub secrets of one session, each with the store it came from.

    Attributes:
      hf_token, kaggle_username, kaggle_key: a :class:`Secret` each, or None.
      origins: secret name -> where it was found (one of :data:`SOURCE_ORDER`).
      notes: secrets that exist but could not be read, and why (names only).
    """

    hf_token: Secret | None = None
    kaggle_username: Secret | None = None
    kaggle_key: Secret | None = None
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def by_name(self) -> dict[str, Secret | None]:
        """``{"HF_TOKEN": Secret | None, "KAGGLE_USERNAME": ..., "KAGGLE_KEY": ...}``."""
        return {HF_TOKEN: self.hf_token, KAGGLE_USERNAME: self.kaggle_username,
                KAGGLE_KEY: self.kaggle_key}

    @property
    def has_kaggle(self) -> bool:
        return self.kaggle_username is not None and self.kaggle_key is not None

    def __repr__(self) -> str:
        parts = []
        for name, secret in self.by_name().items():
            parts.append(f"{name}={'set (' + self.origins[name] + ')' if secret else 'not set'}")
        return f"Credentials({', '.join(parts)})"

    __str__ = __repr__

    def apply_to_environment(self, environ: MutableMapping[str, str] | None = None) -> list[str]:
        """Exports the secrets as ``HF_TOKEN``, ``KAGGLE_USERNAME`` and ``KAGGLE_KEY``.

        huggingface_hub and kagglehub read these variables at each call, so models load
        with these credentials. Nothing is printed.

        Args:
          environ: the mapping to write (default ``os.environ``).

        Returns:
          The names of the variables set.
        """
        environ = os.environ if environ is None else environ
        names = []
        for name, secret in self.by_name().items():
            if secret is not None:
                environ[name] = secret.reveal()
                names.append(name)
        return names

    def redact(self, text: str) -> str:
        """``text`` with every one of these secrets replaced by ``***``."""
        secrets = self.by_name()
        return redact(text, [secrets[n].reveal() for n in REDACTED_NAMES if secrets[n]])


def resolve_credentials(hf_token: str | None = None, kaggle_username: str | None = None,
                        kaggle_key: str | None = None, *,
                        sources: SecretSources | None = None) -> Credentials:
    """Finds each secret in the order explicit > Colab > Kaggle > environment.

    Empty values count as absent. A secret store that is not there (off Colab, off
    Kaggle, Kaggle's secrets add-on off) is skipped; a secret not shared with the
    notebook is skipped and noted by name in ``Credentials.notes``.

    Args:
      hf_token, kaggle_username, kaggle_key: explicit values (first in the order).
      sources: the stores after the explicit values; default
        :meth:`SecretSources.detect` (the machine's own).
    """
    lookup = _Lookup(SecretSources.detect() if sources is None else sources)
    explicit = {HF_TOKEN: hf_token, KAGGLE_USERNAME: kaggle_username, KAGGLE_KEY: kaggle_key}
    found: dict[str, Secret] = {}
    origins: dict[str, str] = {}
    for name in SECRET_NAMES:
        for origin in SOURCE_ORDER:
            value = explicit[name] if origin == "explicit" else getattr(lookup, origin)(name)
            if isinstance(value, str) and value.strip():
                found[name], origins[name] = Secret(value.strip()), origin
                break
    return Credentials(hf_token=found.get(HF_TOKEN), kaggle_username=found.get(KAGGLE_USERNAME),
                       kaggle_key=found.get(KAGGLE_KEY), origins=origins,
                       notes=tuple(lookup.notes))


def resolve_secret(name: str, explicit: str | None = None, *,
                   sources: SecretSources | None = None) -> Secret | None:
    """One secret by name, looked up like the hub secrets: ``explicit``, Colab secrets,
    Kaggle secrets, then the environment (empty values count as absent).

    Returns:
      A :class:`Secret`, or None when no store has it.
    """
    if explicit:
        return Secret(explicit)
    lookup = _Lookup(SecretSources.detect() if sources is None else sources)
    for origin in SOURCE_ORDER:
        if origin == "explicit":
            continue
        value = getattr(lookup, origin)(name)
        if isinstance(value, str) and value.strip():
            return Secret(value.strip())
    return None


def missing_secret_message(what: str, names: Iterable[str]) -> str:
    """A message naming the secrets to add and where, for ``what`` (e.g. a model source)."""
    names = list(names)
    one = len(names) == 1
    return (f"{what} needs the {'secret' if one else 'secrets'} {' and '.join(names)}. "
            f"Add {'it' if one else 'them'}: {WHERE_TO_ADD}.")


# Gemma on Kaggle is gated: kagglehub needs an account that accepted its terms.
_GATED_KAGGLE_PREFIXES = ("google/gemma",)


def _kaggle_logged_in(environ: Mapping[str, str]) -> bool:
    """kagglehub's other ways in: a Kaggle notebook's own auth, an API token, a file."""
    if environ.get("KAGGLE_KERNEL_RUN_TYPE") or environ.get("KAGGLE_API_TOKEN"):
        return True
    home = Path(environ.get("KAGGLE_CONFIG_DIR", "~/.kaggle")).expanduser()
    return (home / "kaggle.json").is_file() or (home / "access_token").is_file()


def _kaggle_cached(handle: str, environ: Mapping[str, str]) -> bool:
    cache = Path(environ.get("KAGGLEHUB_CACHE", "~/.cache/kagglehub")).expanduser()
    return (cache / "models" / handle).is_dir()


def check_model_access(model: str, credentials: Credentials,
                       environ: Mapping[str, str] | None = None) -> None:
    """Fails early, before any download, for a gated model requested without credentials.

    Only sources known to be gated are checked here (Gemma on Kaggle Models); for the
    Hugging Face Hub the Hub itself says whether a repo is gated, and
    ``jaxpost.models.hub`` turns that answer into the same message.

    Raises:
      PermissionError: naming the secrets to add and where to add them.
    """
    environ = os.environ if environ is None else environ
    prefix, _, handle = model.partition(":")
    if prefix != "kaggle" or not handle.startswith(_GATED_KAGGLE_PREFIXES):
        return
    if credentials.has_kaggle or _kaggle_logged_in(environ) or _kaggle_cached(handle, environ):
        return
    raise PermissionError(
        missing_secret_message(f"model {model!r} (gated on Kaggle: accept its terms at "
                               f"https://www.kaggle.com/models/{'/'.join(handle.split('/')[:2])} "
                               "first)", (KAGGLE_USERNAME, KAGGLE_KEY)))


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with each secret value replaced by ``***``.

    Args:
      secrets: the values to hide; default: the current values of ``HF_TOKEN`` and
        ``KAGGLE_KEY`` in the environment (where
        :meth:`Credentials.apply_to_environment` puts them).
    """
    if secrets is None:
        secrets = [os.environ.get(n, "") for n in REDACTED_NAMES]
    # Longest first, so a secret that contains another is hidden whole.
    for value in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text
