"""The API key from the environment: --api-key, else $TIERKV_API_KEY, else $VLLM_API_KEY. Only /v1 routes
need it, as in vLLM; /health, /metrics, /version, /tokenize and /detokenize stay open."""

import pytest

from engine.server.args import parse_serve_args

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
UNAUTHORIZED = {"error": {"message": "Incorrect API key provided. Send it as `Authorization: Bearer <key>`.",
                          "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def no_key_env(monkeypatch):
    for name in ("TIERKV_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_vllm_api_key_guards_v1_routes_only(start_tiny_server, no_key_env):
    no_key_env.setenv("VLLM_API_KEY", "from-vllm-env")
    server = start_tiny_server()
    with server.client() as client:
        without = client.post("/v1/chat/completions", json=CHAT)
        wrong = client.get("/v1/models", headers=bearer("nope"))
        right = client.post("/v1/chat/completions", json=CHAT, headers=bearer("from-vllm-env"))
        models = client.get("/v1/models", headers=bearer("from-vllm-env"))
        open_routes = [client.get("/health"), client.get("/metrics"), client.get("/version"),
                       client.post("/tokenize", json={"prompt": "hi"}), client.post("/detokenize", json={"tokens": [104]})]
    for response in (without, wrong):
        assert response.status_code == 401 and response.json() == UNAUTHORIZED
    assert right.status_code == 200 and right.json()["object"] == "chat.completion"
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["llama"]
    assert [r.status_code for r in open_routes] == [200] * 5


def test_tierkv_api_key_wins_over_vllms(start_tiny_server, no_key_env):
    no_key_env.setenv("VLLM_API_KEY", "vllm-key")
    no_key_env.setenv("TIERKV_API_KEY", "tierkv-key")
    server = start_tiny_server()
    with server.client() as client:
        assert client.get("/v1/models", headers=bearer("vllm-key")).status_code == 401
        assert client.get("/v1/models", headers=bearer("tierkv-key")).status_code == 200


@pytest.mark.parametrize("argv, env, key", [
    (["--api-key", "flag-key"], {"TIERKV_API_KEY": "t", "VLLM_API_KEY": "v"}, "flag-key"),
    ([], {"TIERKV_API_KEY": "t", "VLLM_API_KEY": "v"}, "t"),
    ([], {"TIERKV_API_KEY": "", "VLLM_API_KEY": "v"}, "v"),
    ([], {}, None),
])
def test_precedence_flag_then_tierkv_then_vllm(tiny_model_dir, no_key_env, argv, env, key):
    for name, value in env.items():
        no_key_env.setenv(name, value)
    assert parse_serve_args([tiny_model_dir, *argv]).api_key == key
