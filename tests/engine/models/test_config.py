"""Model configs: what is read, what is refused (the message names the feature), and model path resolution."""

import json
import os
import shutil

import pytest
import torch

from engine.models.config import (
    EMBEDDED_MODEL_FILE,
    UnsupportedModelError,
    load_model_config,
    resolve_model_path,
)
from tests.engine.tiny_models import EOS_TOKEN_ID, make_tiny_model


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3")


def _with_config(src: str, dst, **changes) -> str:
    """Copy of model dir `src` whose config.json has `changes` applied (None deletes a key)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)
    return str(dst)


def test_reads_qwen3_shape(qwen3_dir):
    cfg = load_model_config(qwen3_dir)
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.path == qwen3_dir
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (259, 64, 128, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.qk_norm and not cfg.attention_bias and cfg.rope_scaling is None
    assert cfg.dtype == torch.float32 and cfg.eos_token_ids == (EOS_TOKEN_ID,)


def test_qwen2_has_qkv_bias_but_no_o_proj_bias(tmp_path):
    cfg = load_model_config(make_tiny_model(tmp_path, "qwen2"))
    assert cfg.attention_bias and not cfg.o_proj_bias and not cfg.qk_norm


@pytest.mark.parametrize(("arg", "expected"), [("auto", torch.bfloat16), ("float32", torch.float32),
                                               ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_auto_takes_checkpoint_dtype(tmp_path_factory, arg, expected):
    path = make_tiny_model(tmp_path_factory.mktemp("bf16"), "llama", dtype=torch.bfloat16)
    assert load_model_config(path, arg).dtype == expected


def test_unknown_dtype_names_the_parameter(qwen3_dir):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model_config(qwen3_dir, "float8")


def test_revision_is_stable_and_follows_the_weights(qwen3_dir, tmp_path):
    first = load_model_config(qwen3_dir).revision
    assert load_model_config(qwen3_dir).revision == first and len(first) == 64
    other = make_tiny_model(tmp_path, "qwen3", seed=1)
    assert load_model_config(other).revision != first


@pytest.mark.parametrize(("changes", "feature"), [
    ({"use_sliding_window": True, "sliding_window": 32}, "sliding window attention"),
    ({"num_experts": 8, "architectures": ["Qwen3MoeForCausalLM"]}, "mixture-of-experts"),
    ({"num_local_experts": 8, "architectures": ["MixtralForCausalLM"]}, "mixture-of-experts"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architecture 'GPT2LMHeadModel'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_refusals_name_the_feature(qwen3_dir, tmp_path, changes, feature):
    path = _with_config(qwen3_dir, tmp_path / "m", **changes)
    with pytest.raises(UnsupportedModelError, match="not supported") as err:
        load_model_config(path)
    assert feature in str(err.value)


def test_mistral_sliding_window_refused_unless_null(tmp_path):
    plain = make_tiny_model(tmp_path / "plain", "mistral")
    assert load_model_config(plain).architecture == "MistralForCausalLM"
    windowed = _with_config(plain, tmp_path / "windowed", sliding_window=64)
    with pytest.raises(UnsupportedModelError, match="sliding window attention .*sliding_window=64"):
        load_model_config(windowed)


def test_resolve_model_path(tmp_path, qwen3_dir):
    embedded = resolve_model_path(None)
    assert embedded.endswith(os.sep + EMBEDDED_MODEL_FILE) and os.path.isfile(embedded)
    assert resolve_model_path(qwen3_dir) == qwen3_dir
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    os.symlink(embedded, gguf_dir / "model.gguf")
    assert resolve_model_path(str(gguf_dir)) == str(gguf_dir / "model.gguf")
    assert resolve_model_path(str(gguf_dir / "model.gguf")) == str(gguf_dir / "model.gguf")
    with pytest.raises(FileNotFoundError, match="hub downloads are not supported"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model_path(str(tmp_path / "empty"))


def test_hugging_face_kernels_clash_says_what_to_do(qwen3_dir, monkeypatch):
    """transformers 5.25+ imports Hugging Face's `kernels`, which finds ours: the error must say so
    and how to fix the environment, not leave a bare ImportError from deep inside transformers."""
    import transformers

    class Clashing:
        def __getitem__(self, model_type):
            raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (/src/kernels/__init__.py)")

    monkeypatch.setattr(transformers, "CONFIG_MAPPING", Clashing())
    with pytest.raises(ImportError, match=r"pip install 'transformers<5.25'.*pip uninstall kernels"):
        load_model_config(qwen3_dir, load_format="dummy")
