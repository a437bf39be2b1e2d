"""deploy/kustomize: every overlay renders with `kubectl kustomize`, every object is
valid against the Kubernetes schemas (offline, strict), and the pieces fit together:
probes on the gateway's real paths and port, a restricted securityContext, the image
routes (and only those) sent to flux-proxy.

Gateway API's HTTPRoute is a CRD: kubernetes-validate ships no schema for it, so its
shape is checked by hand below (parentRefs, rules, matches, backendRefs).
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from flux_proxy import FluxProxy
from flux_proxy.config import Settings, load_settings
from flux_proxy.s3_store import S3ImageStore
from flux_proxy.serving import ENDING_SECONDS
from tests.containerfile import parse

ROOT = Path(__file__).parents[1]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
# "overlay+component": the overlay with one of deploy/kustomize/components switched on, as
# the overlay's own comments tell a user to (the ingress companion's S3 store option).
S3_VARIANT = "ingress-companion+s3-store"
OVERLAYS = ("ingress-companion", "sidecar", S3_VARIANT)
# The oldest Kubernetes the manifests are meant for that kubernetes-validate has schemas for.
KUBERNETES_VERSION = "1.30.0"
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
WITHOUT_SCHEMA = {("gateway.networking.k8s.io/v1", "HTTPRoute")}
IMAGE_ROUTES = {
    ("/v1/images/generations", "Exact"),
    ("/v1/images/files", "Prefix"),
    ("/v1/models", "Prefix"),
}
# Where each request path must go, by the rules of Ingress and HTTPRoute path matching.
ROUTED = {
    "/v1/images/generations": "flux-proxy",
    "/v1/images/files/abc.png": "flux-proxy",
    "/v1/models": "flux-proxy",
    "/v1/models/flux1.1-pro": "flux-proxy",
    "/v1/chat/completions": "my-app",
    "/v1/images/edits": "my-app",
    "/v1/images/generations/extra": "my-app",
    "/v1/modelsx": "my-app",
    "/": "my-app",
}
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is not installed: these tests render deploy/kustomize with "
            "`kubectl kustomize` (.ci/run expects it on the machine)"
        )
    return found


@functools.cache
def rendered_text(variant: str) -> str:
    """`kubectl kustomize` once per overlay (it takes ~0.3 s)."""
    overlay, _, component = variant.partition("+")
    with tempfile.TemporaryDirectory() as scratch:
        target = KUSTOMIZE / "overlays" / overlay
        if component:
            # Kustomize takes relative paths only, so the scratch file climbs to the repo.
            up = Path(os.path.relpath(KUSTOMIZE, scratch))
            target = Path(scratch)
            (target / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "resources": [str(up / "overlays" / overlay)],
                        "components": [str(up / "components" / component)],
                    }
                )
            )
        done = subprocess.run(
            [kubectl(), "kustomize", str(target)], capture_output=True, text=True, check=False
        )
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, fresh for each caller (a test may change them)."""
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def all_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def gateway_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "flux-proxy"]
    return container


def settings_of(
    objects: list[dict[str, Any]], tmp_path: Path, environ: dict[str, str] | None = None
) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
    return load_settings(path, environ or {})


def pod_settings(objects: list[dict[str, Any]], tmp_path: Path) -> Settings:
    """The settings the container runs with: the ConfigMap's file and its own variables."""
    container = gateway_container(one(objects, "Deployment"))
    return settings_of(objects, tmp_path, {e["name"]: e["value"] for e in container.get("env", [])})


def secret_values(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {
        name: base64.b64decode(value).decode()
        for secret in all_of(objects, "Secret")
        for name, value in secret["data"].items()
    }


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def image_env() -> dict[str, str]:
    _, final = parse(ROOT / "deploy" / "Containerfile")
    return final.env()


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered):
    _, objects = rendered
    unchecked = set()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.add((obj["apiVersion"], obj["kind"]))
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
    expected_unchecked = WITHOUT_SCHEMA if any(o["kind"] == "HTTPRoute" for o in objects) else set()
    assert unchecked == expected_unchecked


def test_the_validator_rejects_what_strict_mode_should():
    deployment = one(render("ingress-companion"), "Deployment")
    gateway_container(deployment)["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.anyio
async def test_probes_ask_the_gateway_paths_it_serves_on_the_image_port(rendered, tmp_path):
    _, objects = rendered
    container = gateway_container(one(objects, "Deployment"))
    probes = {
        name: container[f"{name}Probe"]["httpGet"] for name in ("startup", "liveness", "readiness")
    }
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startup": "/healthz",
        "liveness": "/healthz",
        "readiness": "/readyz",
    }
    for probe in probes.values():
        assert port_number(container, probe["port"]) == int(image_env()["FLUX_PROXY_SERVER__PORT"])
    # The gateway, on the ConfigMap's settings, answers those very paths with no key.
    app = FluxProxy(settings_of(objects, tmp_path), environ={"FLUX_PROXY_API_KEYS": "sk-x"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
        for probe in probes.values():
            assert (await client.get(probe["path"])).status_code == 200


@pytest.mark.anyio
async def test_prometheus_may_scrape_the_metrics_the_gateway_serves(rendered, tmp_path):
    _, objects = rendered
    deployment = one(objects, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    container = gateway_container(deployment)
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_number(container, "http")
    app = FluxProxy(settings_of(objects, tmp_path), environ={"FLUX_PROXY_API_KEYS": "sk-x"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
        scraped = await client.get(annotations["prometheus.io/path"])  # no client key
    assert scraped.status_code == 200
    assert "# TYPE flux_proxy_requests_total counter" in scraped.text
    # The policy admits the monitoring namespace to that port.
    policy = one(objects, "NetworkPolicy")
    admitted = [
        source
        for rule in policy["spec"]["ingress"]
        if int(annotations["prometheus.io/port"]) in [p["port"] for p in rule["ports"]]
        for source in rule.get("from", [])
    ]
    names = [
        source["namespaceSelector"]["matchExpressions"][0]["values"]
        if "matchExpressions" in source.get("namespaceSelector", {})
        else [source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]]
        for source in admitted
    ]
    assert any("monitoring" in values for values in names)


def test_every_container_is_restricted(rendered):
    _, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        assert {key: container["securityContext"].get(key) for key in RESTRICTED} == RESTRICTED
        assert set(container["resources"]) == {"requests", "limits"}
    # The image's user, as numbers (runAsNonRoot can check only a numeric user).
    _, final = parse(ROOT / "deploy" / "Containerfile")
    uid, _, gid = final.one("USER").partition(":")
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )


def test_the_config_and_keys_reach_the_container(rendered, tmp_path):
    _, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = gateway_container(one(objects, "Deployment"))
    settings = pod_settings(objects, tmp_path)  # a valid config
    config_dir = str(Path(image_env()["FLUX_PROXY_CONFIG"]).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    secrets = all_of(objects, "Secret")
    assert container["envFrom"] == [{"secretRef": {"name": s["metadata"]["name"]}} for s in secrets]
    keys = secret_values(objects)
    expected = {"BFL_API_KEY", "FAL_KEY", "REPLICATE_API_TOKEN", settings.store.signing_key_env}
    if settings.store.backend == "s3":
        expected |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(keys) == expected
    assert all(value.startswith("REPLACE-ME") for value in keys.values())  # placeholders only
    # Writable: /tmp alone, an emptyDir.
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert [m["mountPath"] for m in writable] == ["/tmp"]


def test_the_kubelet_outwaits_the_gateways_own_shutdown(rendered, tmp_path):
    _, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = gateway_container(one(objects, "Deployment"))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert pause > 0
    settings = settings_of(objects, tmp_path)
    grace = settings.server.shutdown_grace_seconds
    # No request within its time limit is ended by the shutdown...
    assert grace >= settings.limits.request_timeout
    # ...and the kubelet waits for the gateway to end the rest before it kills it.
    assert pod["terminationGracePeriodSeconds"] > pause + grace + 2 * ENDING_SECONDS


def test_the_autoscaler_and_the_budget_cover_the_deployment(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    budget = one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert budget.items() <= labels.items()
    for policy in all_of(objects, "NetworkPolicy"):
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


# --- ingress-companion: the split ---------------------------------------------------------


def route(rules: list[tuple[str, str, str]], path: str) -> str | None:
    """The backend for ``path``: Exact beats Prefix, then the longest prefix (by path
    elements), as Ingress and Gateway API both specify."""
    best: tuple[int, int, str] | None = None
    for value, kind, backend in rules:
        if kind == "Exact":
            matched = path == value
        else:
            prefix = value.rstrip("/")
            matched = path == prefix or path.startswith(prefix + "/") or prefix == ""
        if matched:
            rank = (1 if kind == "Exact" else 0, len(value), backend)
            if best is None or rank[:2] > best[:2]:
                best = rank
    return best[2] if best else None


def test_the_ingress_sends_only_the_image_routes_to_flux_proxy(tmp_path):
    objects = render("ingress-companion")
    settings = settings_of(objects, tmp_path)
    ingress = one(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    rules = [
        (p["path"], p["pathType"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]
    ]
    assert {
        (value, kind) for value, kind, backend in rules if backend == "flux-proxy"
    } == IMAGE_ROUTES
    for path, backend in ROUTED.items():
        assert route(rules, path) == backend, path
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    size = annotations[prefix + "proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) * 1024 * 1024 > settings.limits.max_body_bytes
    assert int(annotations[prefix + "proxy-read-timeout"]) > settings.limits.request_timeout
    assert annotations[prefix + "proxy-buffering"] == "off"
    # The flux-proxy backend is the Service in front of the Deployment's image port.
    service = one(objects, "Service")
    container = gateway_container(one(objects, "Deployment"))
    (port,) = service["spec"]["ports"]
    assert port_number(container, port["targetPort"]) == 8080
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        if backend["name"] == "flux-proxy":
            assert backend["port"]["name"] == port["name"]


def test_the_httproute_has_the_shape_gateway_api_requires_and_the_same_split(tmp_path):
    # No offline schema for this CRD: its required fields, checked by hand.
    objects = render("ingress-companion")
    route_object = one(objects, "HTTPRoute")
    assert route_object["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = route_object["spec"]
    assert set(spec) <= {"parentRefs", "hostnames", "rules"}
    assert spec["parentRefs"] and all(ref.get("name") for ref in spec["parentRefs"])
    service_port = one(objects, "Service")["spec"]["ports"][0]["port"]
    rules: list[tuple[str, str, str]] = []
    for rule in spec["rules"]:
        assert set(rule) <= {"matches", "backendRefs", "timeouts", "filters"}
        assert rule["backendRefs"]
        for ref in rule["backendRefs"]:
            assert isinstance(ref["name"], str) and isinstance(ref["port"], int)
            if ref["name"] == "flux-proxy":
                assert ref["port"] == service_port
        (backend,) = {ref["name"] for ref in rule["backendRefs"]}
        for match in rule["matches"]:
            assert set(match) == {"path"}
            kind, value = match["path"]["type"], match["path"]["value"]
            assert kind in ("Exact", "PathPrefix") and value.startswith("/")
            rules.append((value, "Exact" if kind == "Exact" else "Prefix", backend))
        if backend == "flux-proxy":
            timeout = rule["timeouts"]["request"]
            assert timeout.endswith("s")
            assert int(timeout[:-1]) > settings_of(objects, tmp_path).limits.request_timeout
    assert {
        (value, kind) for value, kind, backend in rules if backend == "flux-proxy"
    } == IMAGE_ROUTES
    for path, backend in ROUTED.items():
        assert route(rules, path) == backend, path


# --- ingress-companion: the S3 store option ------------------------------------------------


def test_the_s3_store_option_shares_one_bucket_and_answers_with_links(tmp_path):
    overlay = (KUSTOMIZE / "overlays" / "ingress-companion" / "kustomization.yaml").read_text()
    assert "../../components/s3-store" in overlay  # where the option is documented
    objects = render(S3_VARIANT)
    settings = pod_settings(objects, tmp_path)
    assert settings.store.backend == "s3"
    assert settings.store.s3.bucket and settings.store.s3.prefix
    assert settings.defaults.response_format == "url"  # every replica serves every link
    # The gateway builds its bucket store from those settings and the Secret's keys
    # (no call to the bucket is made to build it).
    app = FluxProxy(settings, environ=secret_values(objects))
    assert isinstance(app.runtime.store, S3ImageStore)
    # Without the option the ingress companion still answers inline (memory store).
    plain = pod_settings(render("ingress-companion"), tmp_path)
    assert (plain.store.backend, plain.defaults.response_format) == ("memory", "b64_json")


# --- sidecar ------------------------------------------------------------------------------


def test_the_sidecar_pod_holds_the_app_pointed_at_localhost():
    objects = render("sidecar")
    deployment = one(objects, "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"app", "flux-proxy"}
    env = {item["name"]: item.get("value") for item in containers["app"]["env"]}
    port = port_number(containers["flux-proxy"], "http")
    assert env["OPENAI_BASE_URL"] == f"http://localhost:{port}/v1"
    # Nothing outside the Pod reaches flux-proxy's port but the monitoring namespace's
    # scrape of /metrics: no Service, and the policy opens it to that namespace only.
    service = one(objects, "Service")
    for service_port in service["spec"]["ports"]:
        assert port_number(containers["app"], service_port["targetPort"]) != port
    policy = one(objects, "NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        if port in [p["port"] for p in rule["ports"]]:
            assert rule["from"] == [MONITORING]
    opened = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert opened != [port]
    assert deployment["metadata"]["name"] == "my-app"
