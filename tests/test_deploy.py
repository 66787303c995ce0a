"""deploy/ stays in step with the code: configs parse with the real parsers, compose.yaml and the
Kubernetes manifests validate against their schemas, dashboards and alerts name only metrics the code
registers, compose / Kubernetes / configs agree on ports, and the daemon's container entrypoint and
health probe work against a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engine.connector.config import parse_kv_transfer_config
from engine.connector.policy import check_policy_tiers, load_policy
from engine.server.args import parse_serve_args
from kvstore.config import parse_bytes, parse_store_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))

import kvstore_entrypoint  # noqa: E402
import kvstore_health  # noqa: E402

# The embedded SmolLM2-135M (30 layers, 3 KV heads, head dim 64) in bf16, offload block_size 256.
SMOLLM2_SLOT_BYTES = 256 * 30 * 2 * 3 * 64 * 2
SECRET_ENV = {"KVSTORE_TOKEN": "t0ken", "REDIS_PASSWORD": "pw", "REDIS_URL": "redis://:pw@redis:6379/0",
              "S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sk", "GRAFANA_ADMIN_PASSWORD": "g"}


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in load_yaml_docs(path):
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def port_of(url_or_addr: str) -> int:
    return urlsplit(url_or_addr if "//" in url_or_addr else f"//{url_or_addr}").port


def render_daemon_config(text: str) -> dict:
    return yaml.safe_load(kvstore_entrypoint.render(text, SECRET_ENV))


# ---------------------------------------------------------------- every file parses


def test_every_yaml_and_json_under_deploy_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 15
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        else:
            assert load_yaml_docs(path), path


# The Kubernetes version the manifests are written for; kubernetes-validate bundles its schemas.
K8S_VERSION = "1.30.0"
# Prometheus operator resources: custom resources with no schema in kubernetes-validate; their
# rules are checked against deploy/prometheus/alerts.yaml below.
OPERATOR_KINDS = {"PrometheusRule", "ServiceMonitor", "PodMonitor"}


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    checked = set()
    for (kind, name), doc in k8s_objects().items():
        if kind in OPERATOR_KINDS:
            continue
        # strict: a misspelt or misplaced field is an error, not silently ignored by the API server
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.add(kind)
    assert {"Namespace", "ConfigMap", "DaemonSet", "Deployment", "Service", "Secret"} <= checked


def test_serve_yaml_is_accepted_by_tierkv_serve_parser():
    cfg = parse_serve_args(["--config", str(DEPLOY / "serve.yaml")])
    assert cfg.port == 8000 and cfg.host == "0.0.0.0"
    assert cfg.api_key is None  # secrets never in a shared config file
    assert cfg.engine.dtype == "bfloat16"  # the slab's slot_bytes depends on it


def test_k8s_serve_config_is_accepted_and_carries_the_daemon_config(tmp_path):
    text = k8s_objects()[("ConfigMap", "tierkv-serve")]["data"]["serve.yaml"]
    (tmp_path / "serve.yaml").write_text(text)
    cfg = parse_serve_args(["--config", str(tmp_path / "serve.yaml")])
    kv = parse_kv_transfer_config(cfg.engine.kv_transfer_config)
    assert kv.offload.auth_token_env == "KVSTORE_TOKEN" and kv.offload.kvstore_shm is True
    assert kv.offload.block_size == 256


@pytest.mark.parametrize("name", ["kv-transfer-config.json", "kv-transfer-config.daemon.json"])
def test_kv_transfer_configs_parse(name):
    cfg = parse_kv_transfer_config((DEPLOY / name).read_text())
    if "daemon" in name:
        assert cfg.offload.kvstore_url and cfg.offload.auth_token_env == "KVSTORE_TOKEN"
    else:
        assert cfg.offload.kvstore_url is None and [t.tier_name for t in cfg.offload.tiers()] == ["memory", "redis", "obj"]
    # with the serve.yaml it is passed along with
    parse_serve_args(["--config", str(DEPLOY / "serve.yaml"), "--kv-transfer-config", (DEPLOY / name).read_text()])


def test_daemon_configs_parse_after_rendering():
    compose_cfg = parse_store_config(render_daemon_config((DEPLOY / "kvstore.compose.yaml").read_text()))
    k8s_cfg = parse_store_config(render_daemon_config(
        k8s_objects()[("ConfigMap", "kvstore-config")]["data"]["kvstore.yaml"]))
    for cfg in (compose_cfg, k8s_cfg):
        assert cfg.auth_token_env == "KVSTORE_TOKEN"
        assert cfg.listen.startswith("0.0.0.0:")
        assert cfg.tiers[0].slot_bytes == SMOLLM2_SLOT_BYTES
        assert [t.type for t in cfg.tiers] == ["memory", "redis", "obj"]
        assert cfg.tiers[2].access_key is None  # S3 keys from the environment (boto3's chain)
    assert compose_cfg.tiers[1].url.get_secret_value() == "redis://:pw@redis:6379/0"


# ---------------------------------------------------------------- metric names exist in the code


def registered_metric_names() -> set[str]:
    """Every series name the code's registries can expose (families have no samples until labelled)."""
    import kvstore.metrics  # noqa: F401  (registers into prometheus_client's default registry)
    import kvstore.tier_metrics  # noqa: F401
    from prometheus_client import REGISTRY

    from engine.connector.metrics import ConnectorMetrics
    from engine.server.metrics import ServerMetrics

    families = [*ServerMetrics("m").registry.collect(), *ConnectorMetrics("m").registry.collect(),
                *(f for f in REGISTRY.collect() if f.name.startswith("kvstore_"))]
    names = set()
    for fam in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[fam.type]
        names.update(fam.name + s for s in suffixes)
    return names


_METRIC = re.compile(r"(?<![A-Za-z0-9_:])((?:vllm:|tierkv_|kvstore_)[A-Za-z0-9_:]*)")


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "tierkv-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_dashboard_and_alerts_name_only_registered_metrics():
    known = registered_metric_names()
    assert "vllm:time_to_first_token_seconds_bucket" in known and "tierkv_offload_store_errors_total" in known
    for expr in dashboard_exprs() + alert_exprs():
        used = _METRIC.findall(expr)
        assert used or expr.startswith("up{"), expr
        unknown = sorted(set(used) - known)
        assert not unknown, f"{unknown} in {expr!r} are not registered by the code"


def test_dashboard_covers_what_operators_watch():
    used = {m for e in dashboard_exprs() for m in _METRIC.findall(e)}
    for name in ["vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                 "tierkv_offload_hit_tokens_total", "tierkv_offload_loaded_bytes_total",
                 "tierkv_offload_saved_bytes_total", "tierkv_offload_load_seconds_bucket",
                 "tierkv_offload_save_seconds_bucket", "tierkv_offload_store_errors_total",
                 "tierkv_offload_dropped_saves_total", "kvstore_tier_blocks", "kvstore_tier_bytes",
                 "kvstore_tier_errors_total", "kvstore_tier_up"]:
        assert name in used, name
    dash = json.loads((DEPLOY / "grafana" / "tierkv-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_cover_outages_and_match_the_prometheus_rule():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"TierkvEngineDown", "KvstoreDaemonDown", "KvstoreTierDown", "KvstoreTierErrorsRising",
            "TierkvOffloadStoreErrorsRising", "TierkvOffloadSavesDropped"} <= names
    operator_rule = k8s_objects()[("PrometheusRule", "tierkv")]
    assert operator_rule["spec"]["groups"] == rules["groups"]
    # the `up{job=...}` alerts match the job names Prometheus gives the targets
    jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    assert {m for e in alert_exprs() for m in re.findall(r'job="([^"]+)"', e)} <= jobs == {"tierkv-engine", "kvstore"}


# ---------------------------------------------------------------- compose


def compose_spec_validator() -> jsonschema.protocols.Validator:
    """A validator for the Compose Specification's JSON schema (compose-spec/compose-spec,
    schema/compose-spec.json, Apache-2.0), as check-jsonschema ships it: `docker compose config`
    checks a file against the same schema, without needing Docker."""
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def compose_errors(doc: dict) -> list[str]:
    """Each schema error as "path/to/key: message" (an empty path for the top level)."""
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_spec_validator().iter_errors(doc))


def test_compose_files_validate_against_the_compose_spec():
    # A compose file is a YAML file with top-level `services`; deploy/kvstore.compose.yaml is not one
    # (it is the daemon's config that compose.yaml mounts, checked by parse_store_config above).
    compose_files = sorted(p.name for p in DEPLOY.glob("*.yaml") if "services" in yaml.safe_load(p.read_text()))
    assert compose_files == ["compose.yaml"]
    assert "./kvstore.compose.yaml:/etc/kvstore/kvstore.yaml:ro" in compose()["services"]["kvstore"]["volumes"]
    assert compose_errors(compose()) == []


def test_compose_spec_validation_rejects_what_compose_would():
    """The schema check is live: a wrong type, an unknown top-level key and a misspelt service key fail."""
    bad_ports = compose()
    bad_ports["services"]["redis"]["ports"] = 5
    assert "services/redis/ports: 5 is not of type 'array'" in compose_errors(bad_ports)
    typo = {**compose(), "servces": {}}
    assert compose_errors(typo) == [": 'servces' does not match any of the regexes: '^x-'"]
    misspelt = compose()
    misspelt["services"]["kvstore"]["shm-size"] = misspelt["services"]["kvstore"].pop("shm_size")
    assert compose_errors(misspelt) == ["services/kvstore: Unevaluated properties are not allowed ('shm-size' was unexpected)"]


def test_compose_wires_the_offload_story():
    c = compose()
    services = c["services"]
    assert {"kvstore", "redis", "minio", "minio-init", "engine-0", "engine-1", "prometheus", "grafana"} <= set(services)
    assert "tierkv-kv" in services["minio-init"]["command"][0]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["kvstore"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    # the slab: the daemon's /dev/shm holds it and the engines share the daemon's IPC namespace
    slab = parse_store_config(render_daemon_config((DEPLOY / "kvstore.compose.yaml").read_text())).tiers[0]
    assert parse_bytes(services["kvstore"]["shm_size"].replace("gb", "GiB")) > slab.bytes
    assert services["kvstore"]["ipc"] == "shareable"
    gpus = set()
    for name in ("engine-0", "engine-1"):
        engine = services[name]
        assert engine["ipc"] == "service:kvstore"
        assert engine["depends_on"]["kvstore"]["condition"] == "service_healthy"
        device = engine["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"]
        gpus.update(device["device_ids"])
        assert engine["environment"]["KVSTORE_TOKEN"].startswith("${KVSTORE_TOKEN")
    assert gpus == {"0", "1"}


def test_compose_secrets_come_from_env_never_command_lines():
    c = compose()
    env_example = {line.split("=", 1)[0] for line in (DEPLOY / "env.example").read_text().splitlines()
                   if line and not line.startswith("#")}
    text = (DEPLOY / "compose.yaml").read_text()
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    assert interpolated <= env_example, interpolated - env_example
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    for name, svc in c["services"].items():
        for key in ("command", "entrypoint"):
            value = svc.get(key) or []
            for arg in [value] if isinstance(value, str) else value:
                # `$$VAR` is the container's shell reading its environment; `${VAR}` would be compose
                # pasting the secret into the command line.
                assert not re.search(r"(?<!\$)\$\{", arg.replace("$$", "")), (name, arg)
                assert not any(v in arg for v in SECRET_ENV.values() if len(v) > 3), (name, arg)


def test_compose_ports_match_the_configs():
    c = compose()
    services = c["services"]
    serve = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    daemon = render_daemon_config((DEPLOY / "kvstore.compose.yaml").read_text())
    grpc_port, metrics_port = port_of(daemon["listen"]), daemon["metrics_port"]
    kv = json.loads((DEPLOY / "kv-transfer-config.daemon.json").read_text())["kv_connector_extra_config"]
    assert urlsplit(kv["kvstore_url"]).hostname == "kvstore" and port_of(kv["kvstore_url"]) == grpc_port
    assert services["kvstore"]["healthcheck"]["test"][-1] == f"127.0.0.1:{daemon['health_port']}"
    for name in ("engine-0", "engine-1"):
        assert services[name]["ports"][0].split(":")[-1] == str(serve["port"])
        assert f"127.0.0.1:{serve['port']}/health" in services[name]["healthcheck"]["test"][-1]
        # stop grace > the SIGTERM drain
        assert int(services[name]["stop_grace_period"].rstrip("s")) > serve["shutdown-timeout"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets["tierkv-engine"] == [f"engine-0:{serve['port']}", f"engine-1:{serve['port']}"]
    assert targets["kvstore"] == [f"kvstore:{metrics_port}"]
    # the embedded-store example points at the compose services
    embedded = json.loads((DEPLOY / "kv-transfer-config.json").read_text())["kv_connector_extra_config"]
    assert embedded["secondary_tiers"][1]["bucket"] == daemon["tiers"][2]["bucket"] == "tierkv-kv"


def test_grafana_provisioning_points_at_the_dashboard():
    c = compose()
    mounts = c["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tierkv.yaml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert f"./grafana/tierkv-dashboard.json:{dash_dir}/tierkv-dashboard.json:ro" in mounts
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- Kubernetes


def test_k8s_ports_probes_and_secrets_agree():
    objs = k8s_objects()
    daemon_cfg = render_daemon_config(objs[("ConfigMap", "kvstore-config")]["data"]["kvstore.yaml"])
    grpc_port, metrics_port = port_of(daemon_cfg["listen"]), daemon_cfg["metrics_port"]
    health_port = daemon_cfg["health_port"]
    ds = objs[("DaemonSet", "kvstore")]["spec"]["template"]
    ds_c = ds["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in ds_c["ports"]}
    assert ports == {"grpc": grpc_port, "health": health_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ds_c[probe]["grpc"]["port"] == health_port
    assert ds["spec"]["hostIPC"] is True
    assert ds["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    svc = objs[("Service", "kvstore")]["spec"]
    assert svc["internalTrafficPolicy"] == "Local"
    assert {p["name"]: p["port"] for p in svc["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
    # the daemon's memory limit covers the slab (tmpfs pages are charged to it)
    slab_bytes = parse_store_config(daemon_cfg).tiers[0].bytes
    assert parse_bytes(ds_c["resources"]["limits"]["memory"].replace("Gi", "GiB")) > slab_bytes

    serve = yaml.safe_load(objs[("ConfigMap", "tierkv-serve")]["data"]["serve.yaml"])
    kv_url = serve["kv-transfer-config"]["kv_connector_extra_config"]["kvstore_url"]
    assert urlsplit(kv_url).hostname.startswith("kvstore.tierkv.svc") and port_of(kv_url) == grpc_port
    dep = objs[("Deployment", "tierkv-engine")]["spec"]["template"]
    c = dep["spec"]["containers"][0]
    assert c["ports"] == [{"name": "http", "containerPort": serve["port"]}]
    assert dep["metadata"]["annotations"]["prometheus.io/port"] == str(serve["port"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600  # weight loading
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert dep["spec"]["terminationGracePeriodSeconds"] > serve["shutdown-timeout"] + pre_stop
    assert dep["spec"]["hostIPC"] is True
    # same uid on both sides: the slab file is mode 0600
    assert dep["spec"]["securityContext"]["runAsUser"] == ds["spec"]["securityContext"]["runAsUser"] == 10001
    assert objs[("Service", "tierkv-engine")]["spec"]["ports"][0]["port"] == serve["port"]

    secret_keys = set(objs[("Secret", "tierkv-secrets")]["stringData"])
    refs = [e["valueFrom"]["secretKeyRef"] for x in (ds_c, c) for e in x["env"] if "valueFrom" in e]
    assert {r["key"] for r in refs} == secret_keys == {"kvstore-token", "redis-url", "s3-access-key", "s3-secret-key"}
    assert all(r["name"] == "tierkv-secrets" for r in refs)
    env = {e["name"] for e in ds_c["env"]}
    assert {"KVSTORE_TOKEN", "REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert "${REDIS_URL}" in objs[("ConfigMap", "kvstore-config")]["data"]["kvstore.yaml"]


def test_dockerfiles_agree_with_the_code():
    for name in ("Dockerfile.engine", "Dockerfile.kvstore"):
        text = (DEPLOY / name).read_text()
        assert "USER 10001:10001" in text and "HEALTHCHECK" in text, name
    engine = (DEPLOY / "Dockerfile.engine").read_text()
    assert "/health" in engine and "EXPOSE 8000" in engine
    kv = (DEPLOY / "Dockerfile.kvstore").read_text()
    assert "--no-deps" in kv and "torch" not in re.sub(r"#.*", "", kv)
    daemon = render_daemon_config((DEPLOY / "kvstore.compose.yaml").read_text())
    ports = (port_of(daemon["listen"]), daemon["health_port"], daemon["metrics_port"])
    assert f"EXPOSE {' '.join(map(str, ports))}" in kv
    assert f'"/usr/local/bin/kvstore-health", "127.0.0.1:{daemon["health_port"]}"]' in kv
    # the daemon image installs exactly pyproject's dependencies minus the engine-only ones
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    engine_only = {"torch", "transformers", "tokenizers", "safetensors", "gguf", "jinja2", "tqdm", "fastapi", "uvicorn"}
    wanted = {d for d in deps if re.split(r"[<>=!~ \[]", d)[0] not in engine_only}
    installed = set(re.findall(r'^\s+"([^"]+)"', kv, re.M))
    assert installed == wanted


# ---------------------------------------------------------------- the daemon's entrypoint and probe


def test_render_fills_env_and_names_what_is_missing():
    assert kvstore_entrypoint.render("url: ${A}/x ${A}", {"A": "v"}) == "url: v/x v"
    with pytest.raises(KeyError, match="B, C"):
        kvstore_entrypoint.render("${C} ${B} ${A}", {"A": "v", "B": ""})
    assert kvstore_entrypoint.render("no vars $HOME", {}) == "no vars $HOME"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_starts_a_daemon_the_health_probe_sees(tmp_path, redis_url):
    grpc_port, port = _free_port(), _free_port()
    config = tmp_path / "kvstore.yaml"
    config.write_text('listen: "127.0.0.1:${KV_PORT}"\nhealth_port: ${HEALTH_PORT}\nauth_token_env: KVSTORE_TOKEN\n'
                      'tiers:\n  - {type: memory, bytes: 16MiB}\n  - {type: redis, url: "${REDIS_URL}"}\n')
    env = {**os.environ, "KV_PORT": str(grpc_port), "HEALTH_PORT": str(port), "REDIS_URL": redis_url,
           "KVSTORE_TOKEN": "s3cret-token"}
    proc = subprocess.Popen([sys.executable, str(DEPLOY / "kvstore_entrypoint.py"), "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not kvstore_health.check(f"127.0.0.1:{port}", timeout_s=1.0):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "daemon did not become SERVING"
            time.sleep(0.2)
        assert kvstore_health.check(f"127.0.0.1:{port}", "tierkv.kvstore.v1.KVStore/tier/redis")
        assert kvstore_health.check(f"127.0.0.1:{grpc_port}")   # the gRPC port answers too
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert redis_url not in cmdline and "/dev/fd/" in cmdline  # the rendered config came by pipe
        probe = subprocess.run([sys.executable, str(DEPLOY / "kvstore_health.py"), f"127.0.0.1:{port}"])
        assert probe.returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not kvstore_health.check(f"127.0.0.1:{port}", timeout_s=0.5)
    assert subprocess.run([sys.executable, str(DEPLOY / "kvstore_health.py"), f"127.0.0.1:{port}"]).returncode == 1


def test_entrypoint_refuses_an_unset_variable(tmp_path):
    config = tmp_path / "kvstore.yaml"
    config.write_text('tiers:\n  - {type: redis, url: "${REDIS_URL_NOT_SET_ANYWHERE}"}\n')
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL_NOT_SET_ANYWHERE"}
    out = subprocess.run([sys.executable, str(DEPLOY / "kvstore_entrypoint.py"), "--config", str(config)],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "REDIS_URL_NOT_SET_ANYWHERE" in out.stderr


def test_compose_redis_command_sets_the_password_its_healthcheck_uses(tmp_path):
    """The compose Redis command (its port and file moved here) writes a config Redis accepts, and the
    healthcheck passes with REDISCLI_AUTH and fails without."""
    import shutil

    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server not installed")
    service = compose()["services"]["redis"]
    port, conf = _free_port(), tmp_path / "redis.conf"
    cmd = (service["command"][0].replace("$$", "$").replace("/tmp/redis.conf", str(conf))
           + f" --port {port} --bind 127.0.0.1 --daemonize no")
    env = {**os.environ, "REDIS_PASSWORD": "0123abcdef"}
    proc = subprocess.Popen(["/bin/sh", "-c", cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check = service["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}")
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["/bin/sh", "-c", check], env={**env, "REDISCLI_AUTH": "0123abcdef"}).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
        assert subprocess.run(["/bin/sh", "-c", check], env={**env, "REDISCLI_AUTH": "wrong"},
                              capture_output=True).returncode == 1
        assert "0123abcdef" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_policies_write_through_to_tiers_the_stores_have():
    """Replicas that do not share a slab share prefixes only through tiers the blocks are written to:
    the policies name Redis, and only tiers the store they talk to has (checked at start-up)."""
    objs = k8s_objects()
    compose_daemon = parse_store_config(render_daemon_config((DEPLOY / "kvstore.compose.yaml").read_text()))
    k8s_daemon = parse_store_config(render_daemon_config(objs[("ConfigMap", "kvstore-config")]["data"]["kvstore.yaml"]))
    k8s_kv = yaml.safe_load(objs[("ConfigMap", "tierkv-serve")]["data"]["serve.yaml"])["kv-transfer-config"]
    embedded = parse_kv_transfer_config((DEPLOY / "kv-transfer-config.json").read_text()).offload
    cases = [(embedded.policy, [t.tier_name for t in embedded.tiers()]),
             (parse_kv_transfer_config((DEPLOY / "kv-transfer-config.daemon.json").read_text()).offload.policy,
              [t.tier_name for t in compose_daemon.tiers]),
             (parse_kv_transfer_config(k8s_kv).offload.policy, [t.tier_name for t in k8s_daemon.tiers])]
    for spec, available in cases:
        check_policy_tiers(load_policy(spec), available)
        assert "redis" in spec["tiers"]
