"""Downloads from the Hugging Face Hub and Kaggle Models, with errors that say what to do.

* :func:`hf_download` fetches a Hugging Face checkpoint (config, safetensors, tokenizer)
  into ``<jaxpost cache>/hf`` with ``huggingface_hub``; a snapshot already there loads
  without network (``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached).
* :func:`kaggle_download` fetches a Kaggle Models handle with ``kagglehub``, and
  :func:`load_kaggle_checkpoint` loads a Gemma Flax (Orbax) checkpoint from it as Tunix's
  GRPO demo does (:func:`jaxpost.models.loading.load_kaggle` picks the loader) (``create_model_from_checkpoint`` for Gemma 3,
  ``Gemma.from_params`` for Gemma 1/2). The Tunix config comes from the handle's
  variation name (see :data:`KAGGLE_VARIATIONS`).

Credentials are read from the session, never from a jaxpost config: ``HF_TOKEN`` for the
Hub (or an explicit ``token``), ``KAGGLE_USERNAME``/``KAGGLE_KEY`` or ``~/.kaggle`` for
Kaggle. No secret is ever printed or put into an error message.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxpost.models.types import LoadedModel, eos_ids, load_sentencepiece
from jaxpost.runtime import cache
from jaxpost.runtime.credentials import WHERE_TO_ADD
from jaxpost.runtime.mesh import use_mesh
from jaxpost.tunix_ext.architectures import gemma, gemma3, gemma3_params, gemma_params
from jaxpost.tunix_ext.gemma3 import enable

HF_ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_LOCAL_HINT = ("use a local checkpoint directory (config.json + *.safetensors + tokenizer) or "
               "'embedded:gemma3-270m', which needs no network")


def hf_cache_dir() -> Path:
    """Where :func:`hf_download` keeps snapshots: ``<jaxpost cache>/hf`` (Hub cache layout)."""
    return cache.cache_root() / "hf"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_download(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """Downloads (or finds in the cache) a Hugging Face model snapshot.

    Only the files a checkpoint needs are fetched: ``*.json``, ``*.safetensors``,
    ``tokenizer.model`` and ``*.txt`` (e.g. ``merges.txt``).

    Args:
      repo_id: ``ORG/NAME``, e.g. ``"Qwen/Qwen2.5-0.5B-Instruct"``.
      token: a Hub token; None lets ``huggingface_hub`` use ``HF_TOKEN`` or a stored login.
      endpoint: a Hub mirror URL; None uses ``HF_ENDPOINT`` or huggingface.co.

    Returns:
      The snapshot directory.

    Raises:
      ValueError: ``repo_id`` is malformed, or no such repository exists.
      PermissionError: the repository is gated or private and the token (``HF_TOKEN``)
        is missing or lacks access.
      ConnectionError: offline (or the Hub is unreachable) and the snapshot is not cached.
    """
    # the hub clients load only when something is downloaded
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    # the hub clients load only when something is downloaded
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"Hugging Face repo id {repo_id!r} is malformed: expected ORG/NAME, "
                         "e.g. 'hf:Qwen/Qwen2.5-0.5B-Instruct'")
    validate_repo_id(repo_id)  # the Hub's own rules ('--', '..', length); a ValueError
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour a later change too.
    offline = constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE")
    kwargs = dict(repo_id=repo_id, allow_patterns=list(HF_ALLOW_PATTERNS),
                  cache_dir=str(hf_cache_dir()), token=token, endpoint=endpoint)
    has_token = token is not None or bool(os.environ.get("HF_TOKEN"))
    try:
        try:
            return Path(snapshot_download(**kwargs, local_files_only=offline))
        except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError):
            # The connection dropped after the repo was listed: use what the cache holds.
            return Path(snapshot_download(**kwargs, local_files_only=True))
    except GatedRepoError:
        raise PermissionError(
            f"Hugging Face repo {repo_id!r} is gated: accept its terms at "
            f"https://huggingface.co/{repo_id} while logged in, then set the HF_TOKEN secret "
            f"to a read token of that account ({WHERE_TO_ADD})"
            + (" (the token in use has no access yet)" if has_token else "")) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"Hugging Face repo {repo_id!r} was not found: check the spelling at "
            f"https://huggingface.co/{repo_id}. If it is private, set the HF_TOKEN secret to a "
            "token with access to it") from None
    except LocalEntryNotFoundError as e:
        why = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline else
               "the Hugging Face Hub could not be reached (no network?)")
        raise ConnectionError(
            f"cannot get Hugging Face repo {repo_id!r}: {why} and it is not in the cache "
            f"{hf_cache_dir()}. Download it once with network access, or {_LOCAL_HINT}"
        ) from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PermissionError(
                f"the Hugging Face Hub refused access to {repo_id!r} (HTTP {status}): set the "
                "HF_TOKEN secret to a valid read token of an account that can see this repo"
            ) from None
        raise


# Kaggle variation -> (family, Tunix ModelConfig factory, version for Gemma.from_params).
# The Orbax checkpoint lies in DOWNLOAD/<variation>, the tokenizer in DOWNLOAD.
KAGGLE_VARIATIONS: dict[str, tuple[str, str, str | None]] = {
    "gemma3-270m": ("gemma3", "gemma3_270m", None),
    "gemma3-270m-it": ("gemma3", "gemma3_270m_it", None),
    "gemma3-1b": ("gemma3", "gemma3_1b_pt", None),
    "gemma3-1b-it": ("gemma3", "gemma3_1b_it", None),
    "gemma3-4b": ("gemma3", "gemma3_4b_pt", None),
    "gemma3-4b-it": ("gemma3", "gemma3_4b_it", None),
    "gemma3-12b": ("gemma3", "gemma3_12b_pt", None),
    "gemma3-12b-it": ("gemma3", "gemma3_12b_it", None),
    "gemma3-27b": ("gemma3", "gemma3_27b_pt", None),
    "gemma3-27b-it": ("gemma3", "gemma3_27b_it", None),
    "gemma2-2b": ("gemma2", "gemma2_2b", "2-2b"),
    "gemma2-2b-it": ("gemma2", "gemma2_2b_it", "2-2b-it"),
    "gemma2-9b": ("gemma2", "gemma2_9b", "2-9b"),
    "gemma2-9b-it": ("gemma2", "gemma2_9b_it", "2-9b-it"),
    "2b": ("gemma", "gemma_2b", "2b"),
    "2b-it": ("gemma", "gemma_2b_it", "2b-it"),
    "7b": ("gemma", "gemma_7b", "7b"),
    "7b-it": ("gemma", "gemma_7b_it", "7b-it"),
    "1.1-2b-it": ("gemma", "gemma1p1_2b_it", "1.1-2b-it"),
    "1.1-7b-it": ("gemma", "gemma1p1_7b_it", "1.1-7b-it"),
}


@dataclasses.dataclass(frozen=True)
class KaggleModel:
    """A parsed ``kaggle:`` handle: ``OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]``."""

    handle: str
    owner: str
    model: str
    framework: str
    variation: str
    version: int | None
    family: str | None
    config_factory: str | None
    from_params_version: str | None

    @property
    def page(self) -> str:
        return f"https://www.kaggle.com/models/{self.owner}/{self.model}"

    def model_config(self) -> Any:
        """The Tunix ``ModelConfig`` for a Flax handle (its variation's preset)."""
        model_lib = gemma3 if self.family == "gemma3" else gemma
        return getattr(model_lib.ModelConfig, self.config_factory)()


def parse_kaggle_handle(handle: str) -> KaggleModel:
    """Parses and checks a Kaggle model handle before anything is downloaded.

    ``flax`` handles need a known variation (:data:`KAGGLE_VARIATIONS`);
    ``transformers`` handles are Hugging Face directories, loaded by ``model_type``.

    Raises:
      ValueError: malformed handle, unsupported framework or unknown variation, listing
        the valid ones.
    """
    parts = handle.split("/") if isinstance(handle, str) else []
    if len(parts) not in (4, 5) or not all(parts):
        raise ValueError(f"Kaggle handle {handle!r} is malformed: expected "
                         "OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION], e.g. "
                         "'kaggle:google/gemma-3/flax/gemma3-1b-it'")
    owner, model, framework, variation = parts[:4]
    version = None
    if len(parts) == 5:
        if not parts[4].isdigit():
            raise ValueError(f"Kaggle handle {handle!r}: version {parts[4]!r} must be a number")
        version = int(parts[4])
    framework = framework.lower()
    if framework == "transformers":
        return KaggleModel(handle, owner, model, framework, variation, version, None, None, None)
    if framework != "flax":
        raise ValueError(f"Kaggle handle {handle!r}: framework {parts[2]!r} is not supported; "
                         "use 'flax' (Orbax checkpoints) or 'transformers' (safetensors)")
    if variation not in KAGGLE_VARIATIONS:
        raise ValueError(f"Kaggle handle {handle!r}: unknown Flax variation {variation!r}; "
                         f"known variations: {', '.join(KAGGLE_VARIATIONS)}")
    family, factory, fp_version = KAGGLE_VARIATIONS[variation]
    return KaggleModel(handle, owner, model, framework, variation, version, family, factory,
                       fp_version)


def kaggle_download(km: KaggleModel) -> Path:
    """``kagglehub.model_download`` with errors that name the credentials to set.

    Raises:
      PermissionError: not authenticated, or the model's terms are not accepted.
      ValueError: no such model, variation or version on Kaggle.
      ConnectionError: Kaggle could not be reached.
    """
    # the hub clients load only when something is downloaded
    import kagglehub
    import requests
    from kagglehub import exceptions as kx

    creds = (f"set the KAGGLE_USERNAME and KAGGLE_KEY secrets ({WHERE_TO_ADD}; or "
             "~/.kaggle/kaggle.json)")
    try:
        return Path(kagglehub.model_download(km.handle))
    except (kx.UnauthenticatedError, kx.CredentialError):
        raise PermissionError(f"Kaggle refused {km.handle!r}: not authenticated; {creds}") from None
    except kx.KaggleApiHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PermissionError(
                f"Kaggle refused {km.handle!r} (HTTP {status}): {creds}, and accept the "
                f"model's terms at {km.page} with that account") from None
        if status == 404:
            raise ValueError(f"Kaggle model {km.handle!r} was not found: check the handle at "
                             f"{km.page}") from None
        raise
    except (requests.ConnectionError, requests.Timeout) as e:
        hint = "" if km.version else " (a handle with /VERSION is served from kagglehub's cache)"
        raise ConnectionError(f"cannot reach Kaggle to get {km.handle!r}{hint}; "
                              f"{_LOCAL_HINT}") from e


def find_tokenizer_model(root: Path) -> Path:
    """The ``tokenizer.model`` in a Kaggle download (the shallowest one)."""
    found = sorted(root.rglob("tokenizer.model"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise FileNotFoundError(f"no tokenizer.model under {root}: Gemma's Flax downloads ship "
                                "their SentencePiece tokenizer beside the checkpoint folder; "
                                "the download may be incomplete (delete it and retry)")
    return found[0]


def kaggle_checkpoint_dir(root: Path, variation: str) -> Path:
    """The Orbax checkpoint folder in a Kaggle download: ``root/<variation>``."""
    ckpt = root / variation
    if ckpt.is_dir():
        return ckpt
    dirs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if len(dirs) == 1:
        return dirs[0]
    raise FileNotFoundError(f"no checkpoint folder {variation!r} in the Kaggle download {root} "
                            f"(it holds: {sorted(p.name for p in root.iterdir())})")


def load_kaggle_checkpoint(root: Path, km: KaggleModel, source: str, mesh, dtype,
                           model_config: Any = None):
    """Loads a downloaded Gemma Flax checkpoint onto ``mesh``.

    Args:
      root: the kagglehub download directory.
      km: the parsed handle.
      source, mesh, dtype: as in :func:`jaxpost.models.loading.load_model`.
      model_config: the Tunix config; None uses the variation's preset (Gemma 3 only:
        Gemma 1/2's ``from_params`` always builds its preset).
    """

    ckpt = kaggle_checkpoint_dir(root, km.variation)
    tokenizer = load_sentencepiece(find_tokenizer_model(root))
    with use_mesh(mesh):
        if km.family == "gemma3":
            cfg = dataclasses.replace(model_config or km.model_config(), param_dtype=dtype)
            model = gemma3_params.create_model_from_checkpoint(
                str(ckpt.resolve()), cfg, mesh=mesh, dtype=dtype)
            enable(model)
        else:
            params = gemma_params.load_and_format_params(str(ckpt.resolve()))
            model = gemma.Gemma.from_params(params, version=km.from_params_version)
            del params
            cfg = model.config
            state = nnx.state(model)
            shardings = nnx.get_named_sharding(state, mesh)
            nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x.astype(dtype), s),
                                           state, shardings))
            logging.getLogger(__name__).info(
                "%s is a %s model: its loss uses Tunix's full logits (jaxpost's chunked "
                "log-probs and decoding loop are written for Gemma 3)", source, km.family)
    # An Orbax checkpoint has no config.json: the end-of-turn id comes from the vocabulary.
    end_of_turn = tokenizer.tokenizer.PieceToId("<end_of_turn>")
    found = {} if end_of_turn == tokenizer.tokenizer.unk_id() else {"eos_token_id": end_of_turn}
    return LoadedModel(model, tokenizer, cfg, mesh, km.family, source, root,
                       eos_ids(tokenizer, found))
