"""Tokenizers: both kinds share the special ids, round-trip text and reload from disk."""

import json
import os

import pytest

from llm_jax.data.tokenizer import (SPECIAL_TOKENS, BpeTokenizer, ByteTokenizer, TokenizerError,
                                    check_vocab_fits, load_tokenizer, train_bpe)

TEXTS = ["Milch -> milk\nBlume -> flower\n", "3 1 2 -> 1 2 3\n", "name=Alice, age=10, city=Berlin"] * 20


def test_special_ids_are_fixed():
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<mask>", "<prompt>", "<response>")
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.prompt_id, tok.response_id) == (0, 1, 2, 3, 4, 5)


def test_byte_tokenizer_round_trip_and_reload(tmp_path):
    tok = ByteTokenizer()
    text = "Tür -> door"
    ids = tok.encode(text)
    assert ids == [b + 6 for b in text.encode("utf-8")]  # bytes shifted past the 6 specials
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    tok.save(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
    assert os.path.exists(tmp_path / "tokenizer.json")


def test_bpe_trains_keeps_special_ids_and_reloads(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=300)
    assert isinstance(tok, BpeTokenizer) and 262 < tok.vocab_size <= 300
    assert [tok._tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(6))
    text = "Blume -> flower\nKäse -> cheese"  # ä never seen in training: byte fallback
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges learned from the corpus
    assert min(ids) >= 6  # plain text never produces a special id
    assert tok.decode([tok.bos_id, tok.prompt_id, *ids, tok.eos_id]) == text
    tok.save(str(tmp_path))
    meta = json.load(open(tmp_path / "meta.json"))
    assert meta["kind"] == "bpe" and meta["special_tokens"] == list(SPECIAL_TOKENS)
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, BpeTokenizer) and again.encode(text) == ids
    assert again.vocab_size == tok.vocab_size


def test_bpe_vocab_below_the_byte_alphabet_is_refused():
    with pytest.raises(TokenizerError, match="262"):
        train_bpe(TEXTS, vocab_size=100)


def test_check_vocab_fits():
    check_vocab_fits(ByteTokenizer(), 262)
    with pytest.raises(TokenizerError, match=r"262 tokens but model.vocab_size=256"):
        check_vocab_fits(ByteTokenizer(), 256)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "odd")
    json.dump({"kind": "wordpiece", "special_tokens": list(SPECIAL_TOKENS)}, open(tmp_path / "odd" / "meta.json", "w"))
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(str(tmp_path / "odd"))
    json.dump({"kind": "byte", "special_tokens": ["<pad>"]}, open(tmp_path / "odd" / "meta.json", "w"))
    with pytest.raises(TokenizerError, match="special tokens"):
        load_tokenizer(str(tmp_path / "odd"))


def _hf_dir(tmp_path, config_text):
    """A tokenizer.json (a tiny word-level vocabulary) and the given tokenizer_config.json text."""
    from tokenizers import Tokenizer, models
    d = tmp_path / "tok"
    d.mkdir()
    Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2}, unk_token="</s>")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_bytes(config_text)
    return str(d)


@pytest.mark.parametrize("text, message", [
    (b"{not json", r"tokenizer_config\.json: not a readable JSON file"),
    (b"\xff\xfe\x00garbage", r"tokenizer_config\.json: not a readable JSON file"),
    (b'["bos_token"]', r"tokenizer_config\.json: expected a JSON object of settings, found list"),
    (b'{"bos_token": 5, "eos_token": "</s>"}', r"tokenizer_config\.json: bos_token=5 is neither a token"),
])
def test_malformed_tokenizer_config_names_the_file(tmp_path, text, message):
    # Before: JSONDecodeError / AttributeError tracebacks, or a non-string token
    # silently dropped and then reported as "no bos token" without the file.
    from llm_jax.data.tokenizer import TokenizerError, load_hf_tokenizer
    with pytest.raises(TokenizerError, match=message):
        load_hf_tokenizer(_hf_dir(tmp_path, text))


def test_wellformed_tokenizer_config_still_loads(tmp_path):
    from llm_jax.data.tokenizer import load_hf_tokenizer
    tok = load_hf_tokenizer(_hf_dir(tmp_path, b'{"bos_token": {"content": "<s>"}, "eos_token": "</s>", '
                                              b'"pad_token": null, "model_max_length": 512}'))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
