"""Loading: the spec, the safetensors weight cache, and the errors for bad models."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from engine.chat import DEFAULT_SYSTEM, build_chat
from engine.loader import MANIFEST, load_model
from engine.spec import ModelSpec


def test_spec_matches_config(loaded):
    cfg, spec = loaded.model.config, loaded.spec
    assert spec.num_layers == cfg.num_hidden_layers == 30
    assert spec.num_heads == cfg.num_attention_heads == 9
    assert spec.num_kv_heads == cfg.num_key_value_heads == 3
    assert spec.head_dim == cfg.head_dim == 64
    assert spec.hidden_size == cfg.hidden_size
    assert spec.rope_theta == 100000.0
    assert spec.rope_scaling is None
    assert spec.dtype == next(loaded.model.parameters()).dtype
    assert spec.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4


def test_weight_cache_is_used_and_corruption_rebuilds(loaded, tmp_path, caplog):
    """The session fixture filled the cache; a copy with one flipped byte is detected and rebuilt."""
    cache = loaded.source  # the GGUF; its cache folder sits under the default home
    from engine.loader import _cached_gguf
    from engine.paths import kvfuse_home

    folder, from_cache = _cached_gguf(cache, kvfuse_home())
    assert from_cache, "the second load in a session must come from the safetensors cache"
    home = tmp_path / "home"
    copy = home / "models" / folder.name
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="engine.loader"):
        rebuilt = load_model(home=home)
    assert not rebuilt.from_cache
    assert "checksum mismatch in model.safetensors" in caplog.text
    assert str(copy) in caplog.text
    assert load_model(home=home).from_cache
    manifest = json.loads((copy / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]


def test_bad_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        load_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_unsupported_architecture_names_it(tmp_path):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama"):
        load_model(folder)


def test_spec_refuses_bad_values(loaded):
    with pytest.raises(ValueError, match="bert"):
        ModelSpec("bert", 1, 1, 1, 1, 1, 1, 1, 1.0)
    with pytest.raises(ValueError, match="num_kv_heads 2"):
        ModelSpec("llama", 1, 3, 2, 64, 64, 10, 10, 1.0)


def test_chat_prompt_matches_template(loaded):
    tok = loaded.tokenizer
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": "Where is Rome?"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert build_chat(tok, "Where is Rome?").ids == list(expected)


def test_chat_prompt_spans_cover_passages(loaded):
    p = build_chat(loaded.tokenizer, "Q?", ["first passage", "second passage"])
    spans = p.spans()
    assert len(spans) == 4 and spans[0][0] == 0 and spans[-1][1] == len(p.ids)
    assert loaded.tokenizer.decode(p.ids[spans[2][0] : spans[2][1]]) == "second passage\n\n"
    with pytest.raises(ValueError, match="question"):
        build_chat(loaded.tokenizer, "  ")
