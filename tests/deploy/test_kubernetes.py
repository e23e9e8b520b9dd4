"""examples/kubernetes: every manifest passes kubernetes-validate in strict mode (offline schemas) for the oldest and
newest Kubernetes versions we promise, the ConfigMap-embedded sidecar and plugin configs pass the project's own
loaders, and the pieces agree with each other and with the sidecar image (ports, probes, token paths, user)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploy.dockerfile import REPO, parse

from circuitwatch.plugin.config import load_plugin_config
from circuitwatch.sidecar import load_config
from circuitwatch.sidecar.circuits import load_circuit_files

try:
    import kubernetes_validate
except ImportError:  # a missing validator must fail the run, not skip it
    pytest.fail("kubernetes_validate not installed: pip install kubernetes-validate", pytrace=False)

K8S_DIR = REPO / "examples" / "kubernetes"
# 1.30: the oldest release still commonly supported (native gRPC probes are GA since 1.27); 1.37: the newest schemas
# kubernetes-validate 1.37 ships.
VERSIONS = ("1.30.0", "1.37.0")
VARIANTS = {
    "plaintext": [K8S_DIR / n for n in ("deployment.yaml", "configmaps.yaml")],
    "tls": [K8S_DIR / "tls" / n for n in ("deployment.yaml", "configmaps.yaml")],
}
SHARED = [K8S_DIR / n for n in ("service.yaml", "storage.yaml", "networkpolicy.yaml")]
MANIFESTS = sorted({*SHARED, *VARIANTS["plaintext"], *VARIANTS["tls"]})


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_every_manifest_is_listed() -> None:
    assert sorted(K8S_DIR.rglob("*.yaml")) == MANIFESTS


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_manifests_validate_strictly(path: Path, version: str) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, version, strict=True)  # raises with the field and reason


def test_strict_validation_catches_a_typo() -> None:
    """Guard against a validator that passes everything."""
    [deployment] = documents(K8S_DIR / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def objects(paths: list[Path]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in [*paths, *SHARED] for d in documents(p)}


def write_config_maps(found: dict, etc: Path) -> dict[str, Path]:
    """Each ConfigMap's files written under etc/<name>/, as the volume would show them."""
    out = {}
    for (kind, name), document in found.items():
        if kind == "ConfigMap":
            folder = etc / name
            folder.mkdir(parents=True)
            for key, text in document["data"].items():
                (folder / key).write_text(text)
            out[name] = folder
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_embedded_configs_pass_the_loaders(variant: str, tmp_path: Path) -> None:
    found = objects(VARIANTS[variant])
    folders = write_config_maps(found, tmp_path)
    config = load_config(folders["circuitwatch-sidecar"] / "sidecar.yaml")
    circuits = load_circuit_files(config.circuits)
    assert len(circuits.circuits) >= 1
    plugin = load_plugin_config(env={"CIRCUITWATCH_CONFIG": str(folders["circuitwatch-plugin"] / "plugin.yaml")})
    assert plugin is not None

    pod = found[("Deployment", "vllm-circuitwatch")]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    vllm, sidecar = containers["vllm"], containers["sidecar"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted(container: dict, path: Path) -> tuple[dict, str]:
        """The volume holding `path` in `container`, and the path inside it."""
        for mount in container["volumeMounts"]:
            root = mount["mountPath"].rstrip("/") + "/"
            if str(path).startswith(root):
                return volumes[mount["name"]], str(path)[len(root) :]
        raise AssertionError(f"{container['name']}: nothing is mounted at {path}")

    def secret_has(container: dict, path: Path) -> None:
        volume, key = mounted(container, path)
        assert "secret" in volume, f"{path} is not in a Secret"
        assert key in [item["path"] for item in volume["secret"]["items"]], f"{path}: no such key"
        assert volume["secret"]["defaultMode"] & 0o022 == 0, "the sidecar refuses group/other-writable files"

    # the sidecar's config and circuits come from its ConfigMap, at the path the image's CMD reads
    command = parse().stage("sidecar").last("CMD").exec_form()
    image_config = Path(command[command.index("--config") + 1])
    volume, key = mounted(sidecar, image_config)
    assert volume["configMap"]["name"] == "circuitwatch-sidecar" and key == "sidecar.yaml"
    assert "command" not in sidecar and "args" not in sidecar  # the image's ENTRYPOINT + CMD
    volume, key = mounted(vllm, Path(next(e["value"] for e in vllm["env"] if e["name"] == "CIRCUITWATCH_CONFIG")))
    assert volume["configMap"]["name"] == "circuitwatch-plugin" and key == "plugin.yaml"
    # evidence in a volume, tokens in Secrets, readable by the image's user through fsGroup
    assert str(config.evidence_dir).startswith("/var/lib/circuitwatch/")
    mounted(sidecar, config.evidence_dir)
    for role in ("ingest", "read", "admin"):
        secret_has(sidecar, getattr(config.auth, f"{role}_token_file"))
    secret_has(vllm, plugin.sidecar.ingest_token_file)
    secret_has(vllm, plugin.sidecar.read_token_file)
    user = parse().stage("sidecar").last("USER").arguments.split(":")[0]
    assert sidecar["securityContext"]["runAsUser"] == int(user) == pod["securityContext"]["fsGroup"]

    # the plugin reaches the sidecar inside the Pod, on the port the sidecar listens on
    listen_port = int(config.listen.rpartition(":")[2])
    host, _, port = plugin.sidecar.address.rpartition(":")
    assert host in ("127.0.0.1", "localhost") and int(port) == listen_port
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["grpc"] == listen_port
    assert ports["metrics"] == config.telemetry.prometheus_port
    annotations = found[("Deployment", "vllm-circuitwatch")]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.telemetry.prometheus_port

    probes = [sidecar[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    if variant == "plaintext":
        # native gRPC probes reach the Pod IP in plaintext: all interfaces, and tokens allowed without TLS
        assert config.listen.startswith("0.0.0.0:") and config.tls is None and config.allow_plaintext_tokens
        assert all(p["grpc"]["port"] == listen_port for p in probes)
        assert probes[1]["grpc"]["service"] == "circuitwatch.v1.Monitor"
        network_policy = found[("NetworkPolicy", "vllm-circuitwatch")]
        open_ports = {p["port"] for rule in network_policy["spec"]["ingress"] for p in rule["ports"]}
        assert listen_port not in open_ports
    else:
        assert config.tls is not None and not config.allow_plaintext_tokens
        secret_has(sidecar, config.tls.cert_file)
        secret_has(sidecar, config.tls.key_file)
        secret_has(vllm, plugin.sidecar.tls_ca_file)
        for probe in probes:
            argv = probe["exec"]["command"]
            assert argv[:2] == ["circuitwatch", "probe"]
            assert argv[argv.index("--target") + 1] == f"127.0.0.1:{listen_port}"
            secret_has(sidecar, Path(argv[argv.index("--tls-ca") + 1]))
            assert argv[argv.index("--tls-server-name") + 1] == host
            assert float(argv[argv.index("--timeout") + 1]) < probe["timeoutSeconds"]


def test_service_selects_the_pod_and_names_the_openai_port() -> None:
    found = objects(VARIANTS["plaintext"])
    service = found[("Service", "vllm-circuitwatch")]
    deployment = found[("Deployment", "vllm-circuitwatch")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    vllm = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in vllm["ports"]}[port["targetPort"]] == 8000
    assert any(re.fullmatch(r"--port=8000", a) for a in vllm["args"])
    claims = {d["metadata"]["name"] for d in documents(K8S_DIR / "storage.yaml")}
    used = {
        v["persistentVolumeClaim"]["claimName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert used == claims
