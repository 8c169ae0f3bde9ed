"""Offline checks of the ferrymq-operator Helm chart: render it with several value sets through
helm-python-sdk (Helm's Go SDK as a shared library, no helm binary, no cluster), lint it, check
the rendered objects, and check that values.schema.json refuses bad values.

Run: python3 -m pytest -q charts/   (.ci/run's `chart` phase does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")

CHARTS = Path(__file__).resolve().parent
CHART_DIR = CHARTS / "ferrymq-operator"
REPO = CHARTS.parent
RELEASE = "fmq"
NAMESPACE = "ferrymq-system"


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART_DIR))


def render(chart, values: dict | None = None) -> list[dict]:
    """Every object the chart renders with `values`, NOTES.txt left out."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert "apiVersion" in doc and "kind" in doc, f"{path}: {doc}"
                assert doc["metadata"]["name"], f"{path}: object without a name"
                objects.append(doc)
    return objects


def notes(chart, values: dict | None = None) -> str:
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[dict]) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


# --- rendering --------------------------------------------------------------------------------


def test_default_values_render_the_operator(chart):
    objects = render(chart)
    assert kinds(objects) == sorted(
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    )
    for o in objects:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "ferrymq-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE, o["kind"]


def test_deployment_probes_ports_and_service_agree(chart):
    objects = render(chart, {"http": {"port": 9100}})
    c = container(objects)
    assert c["ports"] == [{"name": "http", "containerPort": 9100, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    args = c["args"]
    assert args[args.index("--http") + 1] == "0.0.0.0:9100"
    assert c["image"] == "ghcr.io/ferrymq/ferrymq-operator:0.1.0"
    svc = one(objects, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 9100, "targetPort": "http", "protocol": "TCP"}
    ]
    deploy = one(objects, "Deployment")
    assert (
        svc["spec"]["selector"]
        == deploy["spec"]["selector"]["matchLabels"]
        == {
            k: v
            for k, v in deploy["spec"]["template"]["metadata"]["labels"].items()
            if k in svc["spec"]["selector"]
        }
    )
    sa = one(objects, "ServiceAccount")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_image_tag_and_env_overrides(chart):
    c = container(
        render(
            chart,
            {
                "image": {"repository": "registry.local/op", "tag": "dev", "pullPolicy": "Always"},
                "logLevel": "debug",
                "extraEnv": [{"name": "EXTRA", "value": "1"}],
            },
        )
    )
    assert c["image"] == "registry.local/op:dev"
    assert c["imagePullPolicy"] == "Always"
    env = {e["name"]: e for e in c["env"]}
    # The operator's EnvFilter reads RUST_LOG (operator/src/main.rs); FERRYMQ_LOG is the broker's.
    assert env["RUST_LOG"]["value"] == "debug"
    assert "FERRYMQ_LOG" not in env
    assert env["EXTRA"]["value"] == "1"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_service_monitor_off_by_default_and_on_when_asked(chart):
    assert "ServiceMonitor" not in kinds(render(chart))
    objects = render(
        chart,
        {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
    )
    sm = one(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert sm["spec"]["selector"]["matchLabels"] == one(objects, "Service")["spec"]["selector"]
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_leader_election_flags_and_lease_rbac(chart):
    on = render(chart, {"replicas": 2})
    assert one(on, "Deployment")["spec"]["replicas"] == 2
    c = container(on)
    args = c["args"]
    # `--leader-election` is what turns the Lease on; without it every replica reconciles.
    assert "--leader-election" in args
    assert "--no-leader-election" not in args
    assert args[args.index("--lease-name") + 1] == "fmq-ferrymq-operator-leader"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    # The operator reads the Lease namespace and its holder id from these.
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    lease_roles = [o for o in on if o["kind"] == "Role" and o["metadata"]["name"].endswith("-leader-election")]
    assert len(lease_roles) == 1
    assert lease_roles[0]["metadata"]["namespace"] == NAMESPACE

    off = render(chart, {"leaderElection": {"enabled": False}})
    # Off is the operator's default: no flag at all (it has no `--no-leader-election`).
    assert "--leader-election" not in container(off)["args"]
    assert "--no-leader-election" not in container(off)["args"]
    assert "--lease-name" not in container(off)["args"]
    assert "Role" not in kinds(off) and "RoleBinding" not in kinds(off)
    # Without the Lease, two replicas would fight: the chart refuses to render.
    with pytest.raises(helm.HelmError, match="leaderElection"):
        render(chart, {"replicas": 2, "leaderElection": {"enabled": False}})


# --- RBAC -------------------------------------------------------------------------------------

# Each verb is one the controllers' requests need (docs/operator.md, "RBAC"); `create` goes with
# `patch` on children because a server-side apply that creates an object is authorized as both.
APPLIED = {"get", "create", "patch"}
WATCHED = {"list", "watch"}
EXPECTED_RULES = {
    ("ferrymq.io", "mqttbrokers"): {"get"} | WATCHED,
    # The finalizer is the one write outside status (a JSON patch on the object).
    ("ferrymq.io", "applicationclients"): {"get", "patch"} | WATCHED,
    ("ferrymq.io", "mqttbrokers/status"): {"patch"},
    ("ferrymq.io", "applicationclients/status"): {"patch"},
    # blockOwnerDeletion on the children's owner references.
    ("ferrymq.io", "mqttbrokers/finalizers"): {"update"},
    ("ferrymq.io", "applicationclients/finalizers"): {"update"},
    ("apps", "statefulsets"): APPLIED | WATCHED,
    ("", "configmaps"): APPLIED | WATCHED,
    ("", "secrets"): APPLIED | WATCHED,
    ("", "services"): APPLIED | WATCHED | {"delete"},
    ("policy", "poddisruptionbudgets"): APPLIED | WATCHED | {"delete"},
    ("monitoring.coreos.com", "servicemonitors"): APPLIED | {"delete"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# Whether the ServiceMonitor CRD is installed: one GET of one CRD by name.
CRD_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "servicemonitors.monitoring.coreos.com"): {
        "get"
    },
}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "patch"}}


def flatten(rules: list[dict]) -> dict[tuple[str, ...], set[str]]:
    """(group, resource) -> verbs; (group, resource, name) for rules limited by resourceNames."""
    flat: dict[tuple[str, ...], set[str]] = {}
    for rule in rules:
        for verb in rule["verbs"]:
            assert verb != "*", f"wildcard verb in {rule}"
        names = rule.get("resourceNames") or [None]
        for group in rule["apiGroups"]:
            assert group != "*", f"wildcard group in {rule}"
            for resource in rule["resources"]:
                assert resource != "*", f"wildcard resource in {rule}"
                for name in names:
                    key = (group, resource) if name is None else (group, resource, name)
                    flat.setdefault(key, set()).update(rule["verbs"])
    return flat


def by_name(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def assert_bound(binding: dict, role: dict, service_account: str) -> None:
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role["kind"],
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
    ]


def test_cluster_role_grants_exactly_what_the_controllers_use(chart):
    objects = render(chart)
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    roles = by_name(objects, "ClusterRole")
    bindings = by_name(objects, "ClusterRoleBinding")
    assert sorted(roles) == sorted(bindings) == [
        "fmq-ferrymq-operator",
        "fmq-ferrymq-operator-servicemonitor-crd",
    ]
    assert flatten(roles["fmq-ferrymq-operator"]["rules"]) == EXPECTED_RULES
    crd = roles["fmq-ferrymq-operator-servicemonitor-crd"]
    assert flatten(crd["rules"]) == CRD_RULES
    for name, role in roles.items():
        assert_bound(bindings[name], role, sa)
    lease = one(objects, "Role")
    assert lease["metadata"]["namespace"] == NAMESPACE
    assert flatten(lease["rules"]) == LEASE_RULES
    assert_bound(one(objects, "RoleBinding"), lease, sa)


def test_watch_namespace_scopes_the_rbac(chart):
    objects = render(chart, {"watchNamespace": "iot"})
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    # The one cluster-wide grant left: the CRD lookup (a CRD has no namespace).
    assert flatten(one(objects, "ClusterRole")["rules"]) == CRD_RULES
    assert_bound(one(objects, "ClusterRoleBinding"), one(objects, "ClusterRole"), sa)
    roles = by_name(objects, "Role")
    workload = roles["fmq-ferrymq-operator"]
    assert workload["metadata"]["namespace"] == "iot"
    assert flatten(workload["rules"]) == EXPECTED_RULES
    binding = by_name(objects, "RoleBinding")["fmq-ferrymq-operator"]
    assert binding["metadata"]["namespace"] == "iot"
    assert_bound(binding, workload, sa)
    assert flatten(roles["fmq-ferrymq-operator-leader-election"]["rules"]) == LEASE_RULES
    args = container(objects)["args"]
    assert args[args.index("--namespace") + 1] == "iot"


def test_rbac_and_service_account_can_be_left_out(chart):
    objects = render(
        chart,
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}},
    )
    assert kinds(objects) == ["Deployment", "Service"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert "WARNING: rbac.create is false" in notes(
        chart, {"rbac": {"create": False}}
    )


# --- CRDs -------------------------------------------------------------------------------------


def test_crds_are_shipped_and_match_crdgen_output(chart):
    """charts/ferrymq-operator/crds/ must be a copy of crds/*.yaml (crdgen's output, itself
    checked against a fresh generation by the crds crate's tests)."""
    generated = {p.name: p.read_text() for p in sorted((REPO / "crds").glob("*.yaml"))}
    shipped = {p.name: p.read_text() for p in sorted((CHART_DIR / "crds").glob("*.yaml"))}
    assert generated, "no crds/*.yaml: run `cargo run -p ferrymq-crds --bin crdgen`"
    assert shipped == generated, (
        "charts/ferrymq-operator/crds/ differs from crds/*.yaml; "
        "run: rm charts/ferrymq-operator/crds/*.yaml && cp crds/*.yaml charts/ferrymq-operator/crds/"
    )
    names = set()
    for crd in chart.crds:
        for doc in yaml.safe_load_all(crd["data"]):
            if doc:
                assert doc["kind"] == "CustomResourceDefinition"
                names.add(doc["metadata"]["name"])
    assert {"mqttbrokers.ferrymq.io", "applicationclients.ferrymq.io"} <= names


# --- schema -----------------------------------------------------------------------------------

BAD_VALUES = [
    pytest.param({"unknownKey": 1}, id="unknown top-level key"),
    pytest.param({"image": {"repository": "x", "tagg": "1"}}, id="unknown nested key"),
    pytest.param({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, id="pullPolicy enum"),
    pytest.param({"image": {"repository": ""}}, id="empty repository"),
    pytest.param({"replicas": "two"}, id="replicas not an integer"),
    pytest.param({"replicas": -1}, id="negative replicas"),
    pytest.param({"http": {"port": 80}}, id="privileged port"),
    pytest.param({"http": {"port": 70000}}, id="port out of range"),
    pytest.param({"serviceMonitor": {"enabled": "yes"}}, id="enabled not a boolean"),
    pytest.param({"serviceMonitor": {"interval": "soon"}}, id="bad duration"),
    pytest.param({"serviceMonitor": {"labels": {"a": 1}}}, id="non-string label"),
    pytest.param({"watchNamespace": "Bad_NS"}, id="invalid namespace name"),
    pytest.param({"logFormat": "json"}, id="removed key"),
    pytest.param({"service": {"type": "ExternalName"}}, id="service type enum"),
    pytest.param({"resources": {"limits": {"memory": "lots"}}}, id="bad quantity"),
    pytest.param({"leaderElection": {"leaseName": "Not_A_Name"}}, id="bad lease name"),
]


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(copy.deepcopy(bad)))
    # An install renders with the same validation: the bad values never reach a template.
    with pytest.raises(helm.HelmError):
        render(chart, copy.deepcopy(bad))


GOOD_VALUES = [
    pytest.param({}, id="defaults"),
    pytest.param({"replicas": 2, "serviceMonitor": {"enabled": True}}, id="ha and monitoring"),
    pytest.param({"watchNamespace": "iot", "logLevel": "debug"}, id="one namespace"),
    pytest.param(
        {"resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": 1}}},
        id="resources",
    ),
]


@pytest.mark.parametrize("good", GOOD_VALUES)
def test_schema_accepts_good_values_and_lint_is_clean(chart, good):
    chart.validate_schema(chart.merge_values(copy.deepcopy(good)))
    report = helm.lint(str(CHART_DIR), copy.deepcopy(good), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; an info such as "icon is recommended" is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_default_values_file_is_valid(chart):
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    chart.validate_schema(values)
    assert chart.values == values
