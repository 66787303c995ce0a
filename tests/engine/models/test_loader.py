"""Weight loading: fused q/k/v and gate/up, dtype casts, tied embeddings, missing/unexpected tensors; tokenizer."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.config import load_model_config
from engine.models.loader import load_model, load_tokenizer
from tests.engine.tiny_models import EOS_TOKEN_ID, make_tiny_model

CPU = torch.device("cpu")


def _checkpoint(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def test_qkv_and_gate_up_are_fused_in_checkpoint_order(tmp_path):
    path = make_tiny_model(tmp_path, "qwen2", max_shard_size=None, dtype=torch.bfloat16)
    model = load_model(load_model_config(path, "float32"), CPU)
    ckpt = _checkpoint(path)
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    assert attn.qkv_proj.weight.dtype == torch.float32
    for kind in ("weight", "bias"):
        expected = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.{kind}"] for p in "qkv"]).float()
        assert torch.equal(getattr(attn.qkv_proj, kind), expected)
    expected = torch.cat([ckpt[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")]).float()
    assert torch.equal(mlp.gate_up_proj.weight, expected)
    assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"].float())


def test_bf16_model_loads_in_bf16(tmp_path):
    path = make_tiny_model(tmp_path, "llama", dtype=torch.bfloat16)
    model = load_model(load_model_config(path), CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cos_sin_cache.dtype == torch.float32
    assert model.cos_sin_cache.shape == (1024, 16)


def test_tied_embeddings_read_logits_through_the_embedding(tmp_path):
    path = make_tiny_model(tmp_path, "qwen3", tie_word_embeddings=True, max_shard_size=None)
    model = load_model(load_model_config(path), CPU)
    assert model.lm_head is None
    hidden = torch.randn(3, 64)
    assert torch.equal(model.compute_logits(hidden), hidden @ _checkpoint(path)["model.embed_tokens.weight"].T)


def test_missing_tensor_is_named(tmp_path):
    path = make_tiny_model(tmp_path, "llama", max_shard_size=None)
    ckpt = _checkpoint(path)
    del ckpt["model.layers.1.mlp.up_proj.weight"]
    save_file(ckpt, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors: model.layers.1.mlp.up_proj.weight"):
        load_model(load_model_config(path), CPU)


def test_config_with_fewer_layers_than_weights_is_refused(tmp_path):
    path = make_tiny_model(tmp_path, "llama")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.1\..*' has no place"):
        load_model(load_model_config(path), CPU)


def test_tokenizer_round_trips_and_has_chat_template(tmp_path):
    tokenizer = load_tokenizer(load_model_config(make_tiny_model(tmp_path, "qwen3")))
    assert tokenizer.encode("héllo") == [104, 195, 169, 108, 108, 111]
    assert tokenizer.eos_token_id == EOS_TOKEN_ID
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
