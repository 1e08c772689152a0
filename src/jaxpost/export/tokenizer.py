"""The tokenizer and prompt-format files that travel with an export.

A run's prompt format (chat template, system prompt) and its tokenizer's handling of BOS
decide what a model sees; an export that lost them gives other tools' users garbage. So
the PEFT and merged exports hold, beside the weights:

* ``tokenizer.model`` -- the SentencePiece model jaxpost itself reads;
* ``tokenizer.json`` -- the same tokenizer in the tokenizers library's format, converted
  by transformers and checked against SentencePiece, where transformers is installed
  (without it, transformers needs sentencepiece and protobuf to read tokenizer.model);
* ``tokenizer_config.json`` -- ``add_bos_token`` and the special tokens, and the run's
  prompt format as a Jinja ``chat_template`` (:func:`jaxpost.data.prompts.jinja_chat_template`);
* ``special_tokens_map.json``;
* ``generation_config.json`` (merged models) -- BOS, pad and every end-of-turn id, so
  ``generate`` stops where jaxpost does.

The GGUF export carries the same template as ``tokenizer.chat_template``
(:mod:`jaxpost.export.gguf_file`).
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import sentencepiece as spm

from jaxpost.data.prompts import jinja_chat_template, model_chat_template, system_text

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Gemma's chat markers: special in tokenizer.json (decoding with skip_special_tokens
# drops them), control tokens in GGUF, whose eot id is END_OF_TURN's.
END_OF_TURN = "<end_of_turn>"
TURN_MARKERS = ("<start_of_turn>", END_OF_TURN)

# Texts on which a converted tokenizer.json must give SentencePiece's ids: chat markers,
# runs of spaces and newlines, digits, accents, CJK, emoji, byte fallback.
_CHECK_TEXTS = (
    "<start_of_turn>user\nWhat is 7 + 5?<end_of_turn>\n<start_of_turn>model\n",
    "<reasoning>12 = 7 + 5</reasoning><answer>12</answer>",
    "  two  spaces,\n\n\ttab and 1234567890 digits " + " " * 33 + "end",
    "naïve café 東京 🙂 \u200b\u3000\x01",
)


def tokenizer_model_bytes(loaded) -> bytes:
    """The serialized SentencePiece model of a loaded Gemma tokenizer.

    Raises:
      ValueError: the tokenizer is not SentencePiece.
    """
    sp = getattr(loaded.tokenizer, "tokenizer", None)
    if not hasattr(sp, "serialized_model_proto"):
        raise ValueError(f"{loaded.source}: its tokenizer is not SentencePiece; only Gemma "
                         "tokenizers can be exported")
    return sp.serialized_model_proto()


def prompt_format(loaded, config=None) -> tuple[str, str]:
    """``(template name, system text)`` a model was trained to read.

    From the run's ``config`` (its ``chat_template`` and :func:`system_text`) when given,
    else the model family's template and no system text.
    """
    if config is None:
        return model_chat_template(loaded), ""
    return model_chat_template(loaded, config.chat_template), system_text(config)


def _special_tokens(sp) -> dict[str, str]:
    return {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
            "pad_token": sp.id_to_piece(sp.pad_id()), "unk_token": sp.id_to_piece(sp.unk_id())}


def _tokenizer_config(sp) -> dict[str, Any]:
    """``tokenizer_config.json``'s tokenizer: Gemma's, BOS added and EOS not (as jaxpost
    encodes prompts), with its special tokens."""
    return {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True,
            "add_eos_token": False, **_special_tokens(sp)}


def special_token_ids(loaded) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id`` (every id that ends a turn, ``loaded.eos_ids``)
    and ``pad_token_id``, as ``config.json`` and ``generation_config.json`` hold them."""
    tok = loaded.tokenizer
    return {"bos_token_id": int(tok.bos_id()),
            "eos_token_id": [int(i) for i in loaded.eos_ids],
            "pad_token_id": int(tok.pad_id())}


def _say(message: str) -> None:
    print(f"jaxpost: {message}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=2)
def tokenizer_json(tokenizer_model: bytes) -> bytes | None:
    """``tokenizer.json`` for a Gemma SentencePiece model, or None where none can be made.

    transformers converts the model (as it does when it loads a tokenizer.model without
    a tokenizer.json: several seconds for Gemma's 262k pieces, hence the cache), and the
    result is made to split whitespace as SentencePiece does. It is used only when it
    gives SentencePiece's ids (BOS included) on sample texts; where there is none, why
    is said on stderr.
    """
    # transformers is optional (and slow to import): only this file needs it.
    try:
        # transformers takes seconds to import: only for a tokenizer that needs it
        import tokenizers
        from transformers import AutoTokenizer
    except ImportError:
        _say("no tokenizer.json written (transformers is not installed); transformers "
             "then reads tokenizer.model, which needs sentencepiece and protobuf")
        return None
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model, add_bos=True)
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "src", Path(d) / "out"
        src.mkdir()
        (src / TOKENIZER_FILE).write_bytes(tokenizer_model)
        (src / TOKENIZER_CONFIG).write_text(json.dumps(_tokenizer_config(sp)))
        # A failed conversion costs only this optional file; say why and go on.
        try:
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
            converted = json.loads((out / TOKENIZER_JSON).read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001
            _say(f"no tokenizer.json written: transformers could not convert "
                 f"tokenizer.model ({type(e).__name__}: {e})")
            return None
    # Gemma's user-defined pieces include runs of raw spaces ("  ", ids 138-167).
    # SentencePiece turns spaces into "▁" before it looks for user-defined pieces, so it
    # never emits these; the conversion matches them in the raw text ("a  b" -> a, "  ",
    # b). Without them as added tokens the converted tokenizer splits as SentencePiece
    # does; the ids stay in its vocabulary, so they still decode.
    converted["added_tokens"] = [t for t in converted["added_tokens"]
                                 if t["special"] or " " not in t["content"]]
    for token in converted["added_tokens"]:
        if token["content"] in TURN_MARKERS:
            token["special"] = True  # decode(skip_special_tokens=True) drops them
    data = json.dumps(converted, ensure_ascii=False).encode("utf-8")
    fast = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    for text in _CHECK_TEXTS:
        if fast.encode(text).ids != sp.encode(text):
            _say(f"no tokenizer.json written: transformers' conversion tokenizes {text!r} "
                 "unlike SentencePiece")
            return None
    return data


def tokenizer_files(loaded, config=None, *, max_length: int = 32768) -> dict[str, bytes]:
    """The tokenizer files of an export (see the module docstring), by file name.

    Args:
      loaded: the Gemma model whose tokenizer is exported.
      config: the run's config, whose prompt format becomes the chat template (None: the
        family's template, no system prompt).
      max_length: ``model_max_length`` (the model's context length).
    """
    model = tokenizer_model_bytes(loaded)
    sp = loaded.tokenizer.tokenizer
    template, system = prompt_format(loaded, config)
    tok_cfg = {**_tokenizer_config(sp), "model_max_length": max_length,
               "clean_up_tokenization_spaces": False,
               "chat_template": jinja_chat_template(template, system)}
    files = {TOKENIZER_FILE: model,
             TOKENIZER_CONFIG: json.dumps(tok_cfg, indent=2).encode(),
             "special_tokens_map.json": json.dumps(_special_tokens(sp), indent=2).encode()}
    fast = tokenizer_json(model)
    if fast is not None:
        files[TOKENIZER_JSON] = fast
    return files


def generation_config(hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: BOS, pad and the end-of-turn ids of ``config.json``
    (:func:`special_token_ids`)."""
    return {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
