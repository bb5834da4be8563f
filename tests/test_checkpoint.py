"""Checkpoint creation: deterministic bytes, loadable, tokenizer round trip, clear errors."""
from __future__ import annotations

import hashlib
import json

import pytest

from cloudmatrix.checkpoints import load_model
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.presets import create_checkpoint
from cloudmatrix.model.tokenizer import StreamDecoder, TextTokenizer


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_checkpoint):
    again = create_checkpoint("tiny", tmp_path / "again", seed=0)
    other = create_checkpoint("tiny", tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_checkpoint)
    assert _digest(other)["model.safetensors"] != _digest(tiny_checkpoint)["model.safetensors"]
    assert set(_digest(again)) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_tiny_preset_shape(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 10e6
    cfg = model.cfg
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.n_routed_experts) == (4, 1, 16)
    assert (cfg.num_experts_per_tok, cfg.n_shared_experts) == (4, 1)


def test_tokenizer_round_trip_and_stream_decoding(tiny_checkpoint):
    tok = TextTokenizer.load(tiny_checkpoint)
    assert tok.tok.get_vocab_size() == load_model(tiny_checkpoint).cfg.vocab_size
    text = "Dispatch sends tokens to the dies; combine brings them back. Ünïcödé → 中文"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) == text


def test_missing_config_key_is_named():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelConfig.from_dict({"vocab_size": 8, "hidden_size": 8})


def test_missing_weight_is_reported(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file, save_file
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    del state["model.norm.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(broken)


def test_config_json_is_standard(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
