"""The lean GGUF header reader, on the embedded SmolLM2 file."""

import pytest

from engine.models.config import load_model_config, resolve_model_path
from engine.models.gguf_metadata import GGUFArray, gguf_hf_config, read_gguf_header


def test_header_of_embedded_model():
    header = read_gguf_header(resolve_model_path(None))
    assert len(header.tensor_names) == 272 and "output.weight" not in header.tensor_names
    assert header.tensor_names[0] == "token_embd.weight"
    assert header.metadata["tokenizer.ggml.tokens"] == GGUFArray(49152)
    assert header.metadata["tokenizer.ggml.merges"] == GGUFArray(48900)
    assert header.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_hf_config_of_embedded_model():
    config = gguf_hf_config(read_gguf_header(resolve_model_path(None)))
    assert config == {
        "model_type": "llama", "max_position_embeddings": 8192, "num_hidden_layers": 30,
        "intermediate_size": 1536, "hidden_size": 576, "head_dim": 64, "rope_theta": 100000.0,
        "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": pytest.approx(1e-5),
        "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }


def test_not_a_gguf_file_is_refused(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model_config(str(bogus))
