//! The Helm chart (charts/paynotify) with the real `helm` built by scripts/helmtools.sh and the
//! real kube-apiserver of tests/support/control_plane.rs: lint, what the templates render
//! (hardening, stores, least-privilege RBAC, monitoring), every rendered flag accepted by the
//! binary, a server-side dry-run of everything the chart can render (with the
//! ServiceMonitor, PrometheusRule and HTTPRoute CRDs installed from their modules), a real
//! `helm install`/`upgrade`/`uninstall`, and the real `paynotify controller` and
//! `paynotify ingress` running as the chart's ServiceAccounts with the chart's arguments:
//! routes become Ready, notifications are delivered (embedded store and NATS JetStream), the
//! apiserver refuses each role what it must not do, and every metric the alert rules and the
//! dashboard use is in the binaries' real /metrics.

#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/nats.rs"]
#[allow(dead_code)] // the three-server cluster is for tests/jetstream.rs
mod nats;
mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use paynotify::crd::{self, PaymentNotifyRoute};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use support::{Downstream, WEBHOOK_SECRET};
use tokio::sync::OnceCell;

const CHART: &str = "charts/paynotify";
const APP_ID: &str = "2021000000000001";
const TABLE: &str = "paynotify-routing-table";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------- tools

/// A tool or path from scripts/helmtools.sh: `$var` if set, else the script's output (it
/// builds the tools on the first run). Never skips: a missing tool is a failure.
fn helmtool(var: &str) -> PathBuf {
    static SCRIPT: OnceLock<Result<BTreeMap<String, String>, String>> = OnceLock::new();
    let path = match std::env::var(var) {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let vars = SCRIPT.get_or_init(|| {
                let out = Command::new("bash")
                    .arg(repo().join("scripts/helmtools.sh"))
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| format!("cannot run scripts/helmtools.sh: {e}"))?;
                if !out.status.success() {
                    return Err(format!("scripts/helmtools.sh failed ({})", out.status));
                }
                Ok(String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect())
            });
            let vars = vars.as_ref().unwrap_or_else(|e| {
                panic!("{var} is not set and {e}: run `bash scripts/helmtools.sh` and export what it prints")
            });
            PathBuf::from(
                vars.get(var)
                    .unwrap_or_else(|| panic!("scripts/helmtools.sh printed no {var}")),
            )
        }
    };
    assert!(
        path.exists(),
        "{var}={} does not exist: run `bash scripts/helmtools.sh` and export what it prints",
        path.display()
    );
    path
}

/// Runs helm with its own config, cache and data directories (nothing of the user's).
fn helm(args: &[&str]) -> Result<String, String> {
    let home = std::env::temp_dir().join(format!("paynotify-helm-home-{}", std::process::id()));
    let out = Command::new(helmtool("PAYNOTIFY_HELM"))
        .args(args)
        .current_dir(repo())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("helm runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "helm {}: {}\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn set_args<'a>(sets: &[&'a str]) -> Vec<&'a str> {
    sets.iter().flat_map(|s| ["--set", *s]).collect()
}

fn parse_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm template` of the chart as release `release` in `ns`.
fn template(release: &str, ns: &str, sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["template", release, CHART, "--namespace", ns];
    args.extend(set_args(sets));
    helm(&args).map(|t| parse_documents(&t))
}

fn render(release: &str, ns: &str, sets: &[&str]) -> Vec<Value> {
    template(release, ns, sets).unwrap_or_else(|e| panic!("{e}"))
}

/// Every option on: NATS with credentials, HPA, replay, NetworkPolicy, Ingress and HTTPRoute,
/// ServiceMonitor, PrometheusRule and dashboard.
const EVERYTHING: &[&str] = &[
    "store.type=nats",
    "store.nats.credsSecret=nats-creds",
    "ingress.autoscaling.enabled=true",
    "ingress.adminReplay=true",
    "networkPolicy.enabled=true",
    "exposure.ingress.enabled=true",
    "exposure.ingress.className=nginx",
    "exposure.ingress.tls[0].secretName=pay-tls",
    "exposure.ingress.tls[0].hosts[0]=pay.example.com",
    "exposure.httpRoute.enabled=true",
    "exposure.httpRoute.parentRefs[0].name=public",
    "metrics.serviceMonitor.enabled=true",
    "metrics.serviceMonitor.additionalLabels.release=kube-prometheus-stack",
    "metrics.prometheusRule.enabled=true",
    "metrics.prometheusRule.additionalLabels.release=kube-prometheus-stack",
    "metrics.prometheusRule.runbookBaseUrl=https://git.example.com/paynotify/blob/main/",
    "metrics.dashboard.enabled=true",
    "controller.publicBaseUrl=https://pay.example.com",
];

fn kinds(objs: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for o in objs {
        *out.entry(o["kind"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    out
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn all<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn args(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

// ------------------------------------------------------------------------------- render

#[test]
fn the_charts_crd_is_the_generated_one() {
    let chart_copy = std::fs::read_to_string(
        repo().join("charts/paynotify/crds/paymentnotifyroutes.paynotify.dev.yaml"),
    )
    .unwrap();
    assert!(
        chart_copy == crd::crd_yaml().unwrap(),
        "charts/paynotify/crds/ is stale: run `cargo run -- crd > charts/paynotify/crds/paymentnotifyroutes.paynotify.dev.yaml`"
    );
    let top = std::fs::read_to_string(repo().join("crds/paymentnotifyroutes.paynotify.dev.yaml"))
        .unwrap();
    assert_eq!(chart_copy, top, "crds/ and the chart's crds/ differ");
}

#[test]
fn helm_lint_passes_with_the_defaults_and_with_every_option() {
    for sets in [
        &[][..],
        EVERYTHING,
        &[
            "store.type=none",
            "controller.watchNamespaces={shop,billing}",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend(set_args(sets));
        let out = helm(&args).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{out}"
        );
    }
}

#[test]
fn the_defaults_are_a_hardened_installation_with_the_embedded_store() {
    let objs = render("pn", "payments", &[]);
    let expected: BTreeMap<String, usize> = [
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Deployment", 2),
        ("PersistentVolumeClaim", 1),
        ("PodDisruptionBudget", 1),
        ("Role", 2),
        ("RoleBinding", 2),
        ("Service", 3),
        ("ServiceAccount", 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds(&objs), expected);
    for o in &objs {
        if o["kind"] != "ClusterRole" && o["kind"] != "ClusterRoleBinding" {
            assert_eq!(
                o["metadata"]["namespace"], "payments",
                "{}",
                o["metadata"]["name"]
            );
        }
        assert_eq!(o["metadata"]["labels"]["app.kubernetes.io/instance"], "pn");
    }

    for deployment in all(&objs, "Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        assert!(
            pod["securityContext"]["runAsUser"].as_u64().unwrap() > 0,
            "{name}"
        );
        assert!(
            pod["serviceAccountName"].as_str().unwrap().ends_with(
                deployment["metadata"]["labels"]["app.kubernetes.io/component"]
                    .as_str()
                    .unwrap()
            )
        );
        let c = container(deployment);
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["privileged"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(sc["capabilities"].get("add").is_none(), "{name}");
        assert!(c["resources"]["requests"]["memory"].is_string(), "{name}");
        assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
        // Probes on the admin port, which is where --admin-listen binds.
        let admin_port = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "admin")
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap();
        let a = args(deployment);
        assert_eq!(
            arg(&a, "--admin-listen"),
            Some(format!("0.0.0.0:{admin_port}").as_str()),
            "{name}"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin", "{name}");
        let env: BTreeMap<&str, &Value> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        assert_eq!(
            env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
    }

    let controller = find(&objs, "Deployment", "pn-paynotify-controller");
    assert_eq!(controller["spec"]["replicas"], 2);
    let env = &container(controller)["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "POD_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "the controller's identity is its Pod name"
    );
    let ca = args(controller);
    assert_eq!(ca[0], "controller");
    assert_eq!(arg(&ca, "--table-secret"), Some(TABLE));
    assert_eq!(arg(&ca, "--lease-name"), Some("paynotify-controller"));
    assert!(arg(&ca, "--watch-namespaces").is_none());

    // Embedded store: one replica, replaced (never two at once), on the claim.
    let ingress = find(&objs, "Deployment", "pn-paynotify-ingress");
    assert_eq!(ingress["spec"]["replicas"], 1);
    assert_eq!(ingress["spec"]["strategy"]["type"], "Recreate");
    let ia = args(ingress);
    assert_eq!(ia[0], "ingress");
    assert_eq!(arg(&ia, "--store"), Some("/var/lib/paynotify/queue.db"));
    assert_eq!(arg(&ia, "--store-max-bytes"), Some("1073741824"));
    assert_eq!(arg(&ia, "--table-secret"), Some(TABLE));
    assert!(!ia.iter().any(|a| a.starts_with("--nats")));
    assert!(
        !ia.contains(&"--admin-replay".to_string()),
        "replay is off by default"
    );
    let mount = container(ingress)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/paynotify")
        .expect("the store volume is mounted");
    let volume = ingress["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(
        volume["persistentVolumeClaim"]["claimName"],
        "pn-paynotify-store"
    );
    let pvc = find(&objs, "PersistentVolumeClaim", "pn-paynotify-store");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(
        pvc["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    // A PDB on a single replica would block every drain: only the controller has one.
    let pdb = &all(&objs, "PodDisruptionBudget")[0];
    assert_eq!(pdb["metadata"]["name"], "pn-paynotify-controller");
    // Callbacks and admin ports are separate Services.
    let callbacks = find(&objs, "Service", "pn-paynotify-ingress");
    assert_eq!(callbacks["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(callbacks["spec"]["ports"].as_array().unwrap().len(), 1);

    // An existing claim replaces the created one.
    let objs = render(
        "pn",
        "payments",
        &["store.embedded.persistence.existingClaim=mine"],
    );
    assert!(all(&objs, "PersistentVolumeClaim").is_empty());
    let ingress = find(&objs, "Deployment", "pn-paynotify-ingress");
    assert!(
        serde_json::to_string(&ingress["spec"]["template"]["spec"]["volumes"])
            .unwrap()
            .contains("\"claimName\":\"mine\"")
    );
}

#[test]
fn the_nats_store_runs_several_replicas_without_a_volume() {
    let objs = render(
        "pn",
        "payments",
        &[
            "store.type=nats",
            "store.nats.url=nats://nats.messaging:4222",
            "store.nats.credsSecret=nats-creds",
            "store.nats.stream=PAYMENTS",
            "ingress.replicas=3",
        ],
    );
    assert!(all(&objs, "PersistentVolumeClaim").is_empty());
    let ingress = find(&objs, "Deployment", "pn-paynotify-ingress");
    assert_eq!(ingress["spec"]["replicas"], 3);
    assert_eq!(ingress["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        ingress["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let a = args(ingress);
    assert_eq!(arg(&a, "--nats-url"), Some("nats://nats.messaging:4222"));
    assert_eq!(arg(&a, "--nats-creds"), Some("/etc/paynotify/nats/creds"));
    assert_eq!(arg(&a, "--nats-stream"), Some("PAYMENTS"));
    assert_eq!(arg(&a, "--nats-replicas"), Some("3"));
    assert!(arg(&a, "--store").is_none());
    let spec = &ingress["spec"]["template"]["spec"];
    let creds = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "nats-creds")
        .expect("the credentials Secret is a volume");
    assert_eq!(
        creds["secret"]["items"],
        json!([{"key": "creds", "path": "creds"}])
    );
    let mount = container(ingress)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == creds["name"])
        .unwrap()
        .clone();
    assert_eq!(mount["mountPath"], "/etc/paynotify/nats");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        spec["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
    let pdb = find(&objs, "PodDisruptionBudget", "pn-paynotify-ingress");
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // Without credentials there is no --nats-creds and no volume; with the HPA, no replicas.
    let objs = render(
        "pn",
        "payments",
        &["store.type=nats", "ingress.autoscaling.enabled=true"],
    );
    let ingress = find(&objs, "Deployment", "pn-paynotify-ingress");
    assert!(arg(&args(ingress), "--nats-creds").is_none());
    assert!(
        ingress["spec"].get("replicas").is_none(),
        "the HPA owns replicas"
    );
    let hpa = find(&objs, "HorizontalPodAutoscaler", "pn-paynotify-ingress");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        "pn-paynotify-ingress"
    );
    assert_eq!(hpa["spec"]["minReplicas"], 2);
}

#[test]
fn values_that_cannot_work_are_refused() {
    for (sets, expected) in [
        (
            &["ingress.replcas=3"][..],
            "additional properties 'replcas' not allowed",
        ),
        (&["store.type=redis"][..], "/store/type"),
        (
            &["ingress.requestTimeout=soon"][..],
            "/ingress/requestTimeout",
        ),
        (&["store.nats.replicas=2"][..], "/store/nats/replicas"),
        (
            &["ingress.autoscaling.enabled=true"][..],
            "the embedded store runs exactly one ingress replica",
        ),
        (
            &[
                "store.type=nats",
                "ingress.autoscaling.enabled=true",
                "ingress.autoscaling.minReplicas=5",
                "ingress.autoscaling.maxReplicas=3",
            ][..],
            "minReplicas must not exceed maxReplicas",
        ),
        (
            &["exposure.httpRoute.enabled=true"][..],
            "exposure.httpRoute.parentRefs",
        ),
    ] {
        let err = template("pn", "payments", sets)
            .map(|_| ())
            .expect_err(&format!("{sets:?} was accepted"));
        assert!(
            err.contains(expected),
            "{sets:?}: expected {expected:?} in\n{err}"
        );
    }
}

/// The RBAC rules of the rendered objects, by (kind, name, namespace).
fn rules(objs: &[Value]) -> Vec<(String, String, Value)> {
    objs.iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        .flat_map(|o| {
            let who = format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["namespace"].as_str().unwrap_or("-"),
                o["metadata"]["name"].as_str().unwrap()
            );
            let name = o["metadata"]["name"].as_str().unwrap().to_string();
            o["rules"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |r| (who.clone(), name.clone(), r.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap()).collect())
        .unwrap_or_default()
}

#[test]
fn rbac_is_least_privilege() {
    for sets in [&[][..], EVERYTHING] {
        let objs = render("pn", "payments", sets);
        for (who, _, rule) in rules(&objs) {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                assert!(
                    !strings(&rule[field]).contains(&"*"),
                    "{who}: wildcard in {field}"
                );
            }
            let verbs = strings(&rule["verbs"]);
            for forbidden in [
                "delete",
                "deletecollection",
                "escalate",
                "bind",
                "impersonate",
                "*",
            ] {
                assert!(!verbs.contains(&forbidden), "{who}: {forbidden}");
            }
            let resources = strings(&rule["resources"]);
            // Nothing beyond what the binaries use.
            for r in &resources {
                assert!(
                    [
                        "paymentnotifyroutes",
                        "paymentnotifyroutes/status",
                        "secrets",
                        "events",
                        "leases"
                    ]
                    .contains(r),
                    "{who}: {r}"
                );
            }
            if resources.contains(&"secrets") {
                let writes = verbs
                    .iter()
                    .any(|v| ["create", "update", "patch"].contains(v));
                if writes {
                    assert_eq!(
                        strings(&rule["resourceNames"]),
                        [TABLE],
                        "{who}: Secrets are written by name only"
                    );
                }
            }
            if resources.contains(&"events") {
                assert_eq!(strings(&rule["apiGroups"]), ["events.k8s.io"]);
                assert_eq!(
                    verbs,
                    ["create", "patch"],
                    "{who}: Events need create and patch"
                );
            }
        }

        // The ingress: get/watch of the one table Secret, nothing else.
        let ingress = find(&objs, "Role", "pn-paynotify-ingress");
        assert_eq!(
            ingress["rules"],
            json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [TABLE], "verbs": ["get", "watch"]}])
        );
        let binding = find(&objs, "RoleBinding", "pn-paynotify-ingress");
        assert_eq!(binding["subjects"][0]["name"], "pn-paynotify-ingress");
        assert_eq!(binding["roleRef"]["name"], "pn-paynotify-ingress");

        // Leases: only this one is read and renewed.
        let publisher = find(&objs, "Role", "pn-paynotify-controller-publisher");
        for rule in publisher["rules"].as_array().unwrap() {
            if strings(&rule["resources"]) == ["leases"] && strings(&rule["verbs"]) != ["create"] {
                assert_eq!(strings(&rule["resourceNames"]), ["paynotify-controller"]);
            }
        }
        // ServiceAccounts do not mount a token unless the Pod asks (the Deployments do).
        for sa in all(&objs, "ServiceAccount") {
            assert_eq!(sa["automountServiceAccountToken"], false);
        }
    }

    // Watching named namespaces: no ClusterRole at all, a Role in each of them.
    let objs = render(
        "pn",
        "payments",
        &["controller.watchNamespaces={shop,billing}"],
    );
    assert!(all(&objs, "ClusterRole").is_empty());
    assert!(all(&objs, "ClusterRoleBinding").is_empty());
    let controller = find(&objs, "Deployment", "pn-paynotify-controller");
    assert_eq!(
        arg(&args(controller), "--watch-namespaces"),
        Some("shop,billing")
    );
    for ns in ["shop", "billing"] {
        let role = objs
            .iter()
            .find(|o| o["kind"] == "Role" && o["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}"));
        assert!(
            strings(&role["rules"][2]["resources"]).contains(&"secrets"),
            "{role}"
        );
        let binding = objs
            .iter()
            .find(|o| o["kind"] == "RoleBinding" && o["metadata"]["namespace"] == ns)
            .unwrap();
        assert_eq!(binding["subjects"][0]["namespace"], "payments");
    }
}

#[test]
fn monitoring_uses_the_shipped_rules_and_dashboard() {
    let objs = render("pn", "payments", EVERYTHING);
    let monitor = find(&objs, "ServiceMonitor", "pn-paynotify");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(monitor["spec"]["jobLabel"], "paynotify.dev/job");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
    // It selects exactly the two admin Services, whose job labels the alerts expect.
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let selected: BTreeMap<&str, &str> = all(&objs, "Service")
        .into_iter()
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k] == v)
        })
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap(),
                s["metadata"]["labels"]["paynotify.dev/job"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        selected,
        BTreeMap::from([
            ("pn-paynotify-controller-admin", "paynotify-controller"),
            ("pn-paynotify-ingress-admin", "paynotify-ingress")
        ])
    );
    for name in selected.keys() {
        assert_eq!(
            find(&objs, "Service", name)["spec"]["ports"][0]["name"],
            "admin"
        );
    }

    // The PrometheusRule is files/alerts.yaml, with only the runbook base filled in.
    let rule = find(&objs, "PrometheusRule", "pn-paynotify");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let shipped: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/paynotify/files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    let mut expected = shipped.clone();
    for group in expected["groups"].as_array_mut().unwrap() {
        for r in group["rules"].as_array_mut().unwrap() {
            let url = r["annotations"]["runbook_url"]
                .as_str()
                .unwrap()
                .to_string();
            r["annotations"]["runbook_url"] =
                json!(format!("https://git.example.com/paynotify/blob/main/{url}"));
        }
    }
    assert_eq!(rule["spec"], expected);
    let without_base = render("pn", "payments", &["metrics.prometheusRule.enabled=true"]);
    assert_eq!(
        find(&without_base, "PrometheusRule", "pn-paynotify")["spec"],
        shipped
    );

    // The dashboard ConfigMap carries the sidecar's label and the JSON file as is.
    let dashboard = find(&objs, "ConfigMap", "pn-paynotify-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: Value =
        serde_json::from_str(dashboard["data"]["paynotify.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/paynotify/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(embedded, file);

    // Nothing of this by default.
    let objs = render("pn", "payments", &[]);
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
        "Ingress",
        "HTTPRoute",
    ] {
        assert!(all(&objs, kind).is_empty(), "{kind} rendered by default");
    }
}

/// Every flag a Deployment passes is one `paynotify <role> --help` lists (so a renamed flag
/// fails here, not in CrashLoopBackOff).
#[test]
fn every_rendered_flag_is_accepted_by_the_binary() {
    let help = |role: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_paynotify"))
            .args([role, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let helps = BTreeMap::from([
        ("controller", help("controller")),
        ("ingress", help("ingress")),
    ]);
    let mut seen = BTreeSet::new();
    for sets in [
        &[][..],
        EVERYTHING,
        &["store.type=none", "controller.watchNamespaces={a,b}"][..],
    ] {
        for deployment in all(&render("pn", "payments", sets), "Deployment") {
            let a = args(deployment);
            let help = &helps[a[0].as_str()];
            for flag in a[1..].iter().map(|f| f.split('=').next().unwrap()) {
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "`paynotify {}` has no {flag}:\n{help}",
                    a[0]
                );
                seen.insert(flag.to_string());
            }
        }
    }
    for flag in [
        "--store",
        "--nats-url",
        "--nats-creds",
        "--watch-namespaces",
        "--admin-replay",
    ] {
        assert!(seen.contains(flag), "{flag} never rendered");
    }
}

// ------------------------------------------------------------------------------- apiserver

async fn wait<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gvk(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, obj["kind"].as_str().unwrap())
}

/// Server-side apply of one object (as helm renders it), optionally as a dry run; strict
/// field validation, so an unknown or misplaced field is an error.
async fn apply(client: &Client, ns: &str, obj: &Value, dry_run: bool) -> Result<(), String> {
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk(obj))
        .await
        .map_err(|e| format!("{}: {e}", obj["kind"]))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj["metadata"]["namespace"].as_str().unwrap_or(ns),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("paynotify-chart-tests")
        .force()
        .validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    let name = obj["metadata"]["name"].as_str().unwrap();
    api.patch(name, &params, &Patch::Apply(obj))
        .await
        .map(|_| ())
        .map_err(|e| format!("{} {name}: {e}", obj["kind"]))
}

/// The paynotify CRD, and the ServiceMonitor, PrometheusRule and HTTPRoute CRDs from their
/// modules (scripts/helmtools.sh), installed once per test binary and Established.
async fn admin() -> Client {
    static CRDS: OnceCell<()> = OnceCell::const_new();
    let client = control_plane::client().await;
    CRDS.get_or_init(|| async {
        let mut docs = vec![serde_json::to_value(crd::crd()).unwrap()];
        let dir = helmtool("PAYNOTIFY_TEST_CRDS");
        for file in [
            "monitoring.coreos.com_servicemonitors.yaml",
            "monitoring.coreos.com_prometheusrules.yaml",
            "gateway.networking.k8s.io_httproutes.yaml",
        ] {
            let text = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()));
            docs.extend(parse_documents(&text));
        }
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for doc in &docs {
            let name = doc["metadata"]["name"].as_str().unwrap();
            crds.patch(
                name,
                &PatchParams::apply("paynotify-chart-tests").force(),
                &Patch::Apply(doc),
            )
            .await
            .unwrap_or_else(|e| panic!("CRD {name}: {e}"));
            wait(
                &format!("CRD {name} established"),
                Duration::from_secs(60),
                || async {
                    let crd = crds.get(name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                },
            )
            .await;
        }
    })
    .await;
    client
}

#[tokio::test]
async fn everything_the_chart_renders_passes_a_server_side_dry_run() {
    let client = admin().await;
    let ns = control_plane::unique_namespace("chart-dry").await;
    let shop = control_plane::unique_namespace("chart-dry-shop").await;
    let watch = format!("controller.watchNamespaces={{{shop}}}");
    let variants: Vec<(&str, Vec<&str>)> = vec![
        ("defaults", vec![]),
        ("everything", EVERYTHING.to_vec()),
        (
            "watch",
            vec![watch.as_str(), "store.type=none", "ingress.replicas=3"],
        ),
    ];
    let mut checked = BTreeSet::new();
    for (release, sets) in &variants {
        let objs = render(release, &ns, sets);
        for obj in &objs {
            apply(&client, &ns, obj, true)
                .await
                .unwrap_or_else(|e| panic!("{release}: the apiserver refused {e}"));
            checked.insert(obj["kind"].as_str().unwrap().to_string());
        }
    }
    // The chart's CRD through helm's own path.
    let crds = parse_documents(&helm(&["show", "crds", CHART]).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(crds.len(), 1);
    apply(&client, &ns, &crds[0], true).await.unwrap();
    for kind in [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "HTTPRoute",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ] {
        assert!(checked.contains(kind), "{kind} was not checked");
    }

    // The dry run does validate: a misplaced field is refused.
    let mut bad = find(
        &render("defaults", &ns, &[]),
        "Deployment",
        "defaults-paynotify-ingress",
    )
    .clone();
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] =
        json!(true);
    let err = apply(&client, &ns, &bad, true).await.unwrap_err();
    assert!(err.contains("readOnlyRootFS"), "{err}");
    let mut bad_rule = find(
        &render("everything", &ns, EVERYTHING),
        "PrometheusRule",
        "everything-paynotify",
    )
    .clone();
    bad_rule["spec"]["groups"][0]["rules"][0]["for"] = json!("five minutes");
    assert!(
        apply(&client, &ns, &bad_rule, true).await.is_err(),
        "the PrometheusRule schema is enforced"
    );
}

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_against_the_apiserver() {
    let client = admin().await;
    let ns = control_plane::unique_namespace("chart-helm").await;
    let kubeconfig = control_plane::kubeconfig_path()
        .to_str()
        .unwrap()
        .to_string();
    let helm_in = |cmd: &[&str], sets: &[&str]| {
        let mut a: Vec<&str> = cmd.to_vec();
        a.extend([
            "--namespace",
            ns.as_str(),
            "--kubeconfig",
            kubeconfig.as_str(),
        ]);
        a.extend(set_args(sets));
        helm(&a).unwrap_or_else(|e| panic!("{e}"))
    };
    let out = helm_in(
        &["install", "pay", CHART],
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
        ],
    );
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(out.contains("kubectl get pnr -A"), "NOTES.txt: {out}");

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let ingress = deployments.get("pay-paynotify-ingress").await.unwrap();
    assert_eq!(ingress.spec.as_ref().unwrap().replicas, Some(1));
    let controller = deployments.get("pay-paynotify-controller").await.unwrap();
    assert_eq!(controller.spec.as_ref().unwrap().replicas, Some(2));
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    pvcs.get("pay-paynotify-store").await.unwrap();
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    cluster_roles.get("pay-paynotify-controller").await.unwrap();
    let rules = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &kube::discovery::pinned_kind(
            &client,
            &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule"),
        )
        .await
        .unwrap()
        .0,
    );
    rules.get("pay-paynotify").await.unwrap();
    let listed = helm_in(&["list", "--output", "json"], &[]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["name"], "pay");
    assert_eq!(listed[0]["status"], "deployed");

    // Upgrade to NATS with three replicas: the claim is kept (it may hold undelivered events).
    let out = helm_in(
        &["upgrade", "pay", CHART],
        &[
            "store.type=nats",
            "ingress.replicas=3",
            "controller.leaseSeconds=20",
        ],
    );
    assert!(out.contains("REVISION: 2"), "{out}");
    let ingress = deployments.get("pay-paynotify-ingress").await.unwrap();
    let spec = ingress.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let args = spec.template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.contains(&"--nats-url=nats://nats:4222".to_string()),
        "{args:?}"
    );
    let controller = deployments.get("pay-paynotify-controller").await.unwrap();
    let cargs = controller.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(cargs.contains(&"--lease-seconds=20".to_string()));
    pvcs.get("pay-paynotify-store").await.unwrap();
    assert!(
        rules.get_opt("pay-paynotify").await.unwrap().is_none(),
        "rules off again"
    );

    let out = helm_in(&["uninstall", "pay", "--wait"], &[]);
    assert!(out.contains("uninstalled"), "{out}");
    assert!(
        deployments
            .get_opt("pay-paynotify-ingress")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        cluster_roles
            .get_opt("pay-paynotify-controller")
            .await
            .unwrap()
            .is_none()
    );
    pvcs.get("pay-paynotify-store")
        .await
        .expect("the store's claim survives an uninstall");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.get("paymentnotifyroutes.paynotify.dev")
        .await
        .expect("Helm never deletes the CRD");
}

// ------------------------------------------------------------------------------- binaries

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with the Deployment's arguments, except the listen addresses (loopback ports)
/// and the store file (a temp dir), as `user`, with the Pod's downward-API environment.
fn spawn_from_deployment(
    deployment: &Value,
    kubeconfig: &Path,
    ns: &str,
    ports: &BTreeMap<&str, u16>,
    dir: &Path,
    log: &str,
) -> Process {
    let mut a = args(deployment);
    for arg in a.iter_mut() {
        if let Some((flag, _)) = arg.split_once('=') {
            if let Some(port) = ports.get(flag) {
                *arg = format!("{flag}=127.0.0.1:{port}");
            } else if flag == "--store" {
                *arg = format!("--store={}", dir.join("queue.db").display());
            }
        }
    }
    let name = deployment["metadata"]["name"].as_str().unwrap();
    let log = std::fs::File::create(dir.join(log)).unwrap();
    Process(
        Command::new(env!("CARGO_BIN_EXE_paynotify"))
            .args(&a)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", ns)
            .env("POD_NAME", format!("{name}-0"))
            .env("RUST_LOG", "info,paynotify=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    Some((resp.status().as_u16(), resp.text().await.ok()?))
}

async fn put_secret(client: &Client, ns: &str, name: &str, data: &[(&str, &[u8])]) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": data.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned())).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

fn route(name: &str, path: &str, target: &str, delivery: Value) -> Value {
    json!({
        "apiVersion": "paynotify.dev/v1alpha1",
        "kind": "PaymentNotifyRoute",
        "metadata": {"name": name},
        "spec": {
            "path": path,
            "provider": {"alipay": {"appId": APP_ID, "signType": "RSA2",
                "publicKey": {"secretKeyRef": {"name": "alipay", "key": "alipay_public_key"}}}},
            "targets": [{"url": target}],
            "delivery": delivery,
            "signing": {"secret": {"secretKeyRef": {"name": "webhook", "key": "secret"}}}
        }
    })
}

async fn create_route(client: &Client, ns: &str, route: Value) {
    let api: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(route).unwrap(),
    )
    .await
    .unwrap();
}

async fn ready(client: &Client, ns: &str, name: &str) -> bool {
    let api: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), ns);
    api.get(name)
        .await
        .ok()
        .and_then(|r| r.status)
        .is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn service_account_user(ns: &str, sa: &str) -> (String, Vec<String>) {
    (
        format!("system:serviceaccount:{ns}:{sa}"),
        vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{ns}"),
        ],
    )
}

/// Asks the apiserver whether `user` may do `verb` (SubjectAccessReview).
#[allow(clippy::too_many_arguments)]
async fn allowed(
    client: &Client,
    (user, groups): &(String, Vec<String>),
    verb: &str,
    group: &str,
    resource: &str,
    subresource: Option<&str>,
    ns: Option<&str>,
    name: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.clone()),
            groups: Some(groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(Into::into),
                namespace: ns.map(Into::into),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

/// Metric names (`foo_bucket` and all) of a Prometheus text exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// The `paynotify_*` metric names a PromQL expression reads (quoted strings removed first).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut quoted = false;
    for c in expr.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted {
            unquoted.push(c);
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("paynotify_"))
        .map(str::to_string)
        .collect()
}

/// Every expression of the alert rules and the dashboard, with where it comes from.
fn shipped_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/paynotify/files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/paynotify/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?}", panel["title"].as_str().unwrap()),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            out.push((format!("variable {}", var["name"]), q.to_string()));
        }
    }
    out
}

/// Applies the rendered release for real (server-side apply), returns the objects.
async fn install_release(client: &Client, release: &str, ns: &str, sets: &[&str]) -> Vec<Value> {
    let objs = render(release, ns, sets);
    for obj in &objs {
        apply(client, ns, obj, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    objs
}

struct Running {
    _controller: Process,
    _ingress: Process,
    port: u16,
    admin: u16,
    controller_admin: u16,
}

/// Starts the controller and the ingress of a rendered release as its ServiceAccounts.
fn start_release(objs: &[Value], release: &str, ns: &str, dir: &Path) -> Running {
    let plane = control_plane::shared();
    let controller = find(
        objs,
        "Deployment",
        &format!("{release}-paynotify-controller"),
    );
    let ingress = find(objs, "Deployment", &format!("{release}-paynotify-ingress"));
    let kubeconfig = |deployment: &Value| {
        let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let (user, groups) = service_account_user(ns, sa);
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        plane.user_kubeconfig(&user, &groups)
    };
    let (port, admin, controller_admin) = (free_port(), free_port(), free_port());
    let controller = spawn_from_deployment(
        controller,
        &kubeconfig(controller),
        ns,
        &BTreeMap::from([("--admin-listen", controller_admin)]),
        dir,
        "controller.log",
    );
    let ingress = spawn_from_deployment(
        ingress,
        &kubeconfig(ingress),
        ns,
        &BTreeMap::from([("--listen", port), ("--admin-listen", admin)]),
        dir,
        "ingress.log",
    );
    Running {
        _controller: controller,
        _ingress: ingress,
        port,
        admin,
        controller_admin,
    }
}

fn logs(dir: &Path) -> String {
    ["controller.log", "ingress.log"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            format!(
                "--- {f} (last lines)\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn post(port: u16, path: &str, body: Vec<u8>) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("paynotify-chart-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A user with exactly `rules` in `ns` (and a Lease of its own in `lease_ns`), for the
/// controllers that must fail.
async fn user_with(client: &Client, name: &str, rules: &[(&str, Value)]) -> PathBuf {
    for (ns, rule) in rules {
        let role = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": ns}, "rules": rule,
        });
        let binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name}],
        });
        apply(client, ns, &role, false).await.unwrap();
        apply(client, ns, &binding, false).await.unwrap();
    }
    control_plane::shared().user_kubeconfig(name, &[])
}

/// Runs a controller outside the chart with a broken RBAC, until `metric` shows up.
async fn failing_controller(
    kubeconfig: &Path,
    ns: &str,
    watch: &str,
    lease: &str,
    dir: &Path,
    metric: &str,
) -> String {
    let admin = free_port();
    let log = std::fs::File::create(dir.join(format!("{lease}.log"))).unwrap();
    let _process = Process(
        Command::new(env!("CARGO_BIN_EXE_paynotify"))
            .args([
                "controller",
                "--namespace",
                ns,
                "--watch-namespaces",
                watch,
                "--identity",
                lease,
                "--lease-name",
                lease,
                "--table-secret",
                lease,
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait(
        &format!("{metric} from {lease}"),
        Duration::from_secs(60),
        || async {
            let (_, text) = http_get(admin, "/metrics").await?;
            text.lines().any(|l| l.starts_with(metric)).then_some(text)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_and_arguments_run_the_real_binaries_and_nothing_more() {
    let client = admin().await;
    let ns = control_plane::unique_namespace("chart-run").await;
    let shop = control_plane::unique_namespace("chart-run-shop").await;
    let dir = temp_dir("run");
    let objs = install_release(&client, "run", &ns, &["ingress.adminReplay=true"]).await;
    let running = start_release(&objs, "run", &ns, &dir);

    let key = support::test_key();
    put_secret(
        &client,
        &shop,
        "alipay",
        &[("alipay_public_key", key.spki_pem().unwrap().as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &shop,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    let ok = Downstream::start().await;
    let refusing = Downstream::start().await;
    refusing.set_status(503);
    create_route(
        &client,
        &shop,
        route(
            "sync",
            &format!("/notify/{shop}/sync"),
            &ok.url,
            json!({"mode": "Synchronous", "timeout": "3s"}),
        ),
    )
    .await;
    create_route(
        &client,
        &shop,
        route(
            "queued",
            &format!("/notify/{shop}/queued"),
            &refusing.url,
            json!({"mode": "Queued", "timeout": "1s", "retry": {"schedule": ["100ms", "200ms"]}}),
        ),
    )
    .await;
    for name in ["sync", "queued"] {
        let (client, shop) = (client.clone(), shop.clone());
        let start = Instant::now();
        while !ready(&client, &shop, name).await {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "route {name} never became Ready with the chart's RBAC\n{}",
                logs(&dir)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let start = Instant::now();
    while http_get(running.admin, "/readyz").await.map(|r| r.0) != Some(200)
        || !http_get(running.admin, "/metrics")
            .await
            .is_some_and(|(_, m)| {
                m.contains(&format!("route=\"{shop}/sync\""))
                    && m.contains(&format!("route=\"{shop}/queued\""))
            })
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the ingress never served both routes with the chart's RBAC\n{}",
            logs(&dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Synchronous: delivered before the answer. A forgery: refused.
    let body = support::alipay_payment(&key, APP_ID, "CHART-1");
    assert_eq!(
        post(running.port, &format!("/notify/{shop}/sync"), body.clone()).await,
        (200, "success".into())
    );
    assert_eq!(ok.count(), 1);
    support::check_webhook(&ok.all()[0], WEBHOOK_SECRET);
    let other = support::test_key();
    let forged = support::alipay_payment(&other, APP_ID, "CHART-2");
    assert_eq!(
        post(running.port, &format!("/notify/{shop}/sync"), forged).await,
        (400, "fail".into())
    );
    assert_eq!(
        post(running.port, "/notify/nowhere", b"x".to_vec()).await.0,
        404
    );

    // Queued on the embedded store (the chart's --store): acknowledged at once, retried,
    // dead-lettered, then replayed through the admin port (ingress.adminReplay).
    let body = support::alipay_payment(&key, APP_ID, "CHART-3");
    assert_eq!(
        post(running.port, &format!("/notify/{shop}/queued"), body).await,
        (200, "success".into())
    );
    let metrics = wait("a dead letter", Duration::from_secs(30), || async {
        let (_, m) = http_get(running.admin, "/metrics").await?;
        m.lines()
            .any(|l| l.starts_with("paynotify_dead_letters{") && l.ends_with(" 1"))
            .then_some(m)
    })
    .await;
    assert!(
        metrics.contains("paynotify_delivery_retries_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paynotify_dead_letters_total{"),
        "{metrics}"
    );
    refusing.set_status(204);
    let replay = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/replay", running.admin))
        .json(&json!({"route": format!("{shop}/queued")}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        replay.status().as_u16(),
        200,
        "{}",
        replay.text().await.unwrap()
    );
    wait("the replayed delivery", Duration::from_secs(30), || async {
        refusing.all().iter().any(|r| r.ok()).then_some(())
    })
    .await;
    let ingress_metrics = wait("the queue drained", Duration::from_secs(30), || async {
        let (_, m) = http_get(running.admin, "/metrics").await?;
        (m.contains("paynotify_replayed_total{") && m.contains("paynotify_queue_depth{"))
            .then_some(m)
    })
    .await;
    let (_, controller_metrics) = http_get(running.controller_admin, "/metrics")
        .await
        .unwrap();
    assert!(
        controller_metrics.contains("paynotify_controller_leader 1"),
        "{controller_metrics}"
    );

    // The apiserver refuses each role everything it does not need.
    let ingress_user = service_account_user(&ns, "run-paynotify-ingress");
    let controller_user = service_account_user(&ns, "run-paynotify-controller");
    let n = Some(ns.as_str());
    let s = Some(shop.as_str());
    let table = Some(TABLE);
    type Check<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        bool,
    );
    let ingress_checks: &[Check] = &[
        ("get", "", "secrets", None, n, table, true),
        ("watch", "", "secrets", None, n, table, true),
        ("list", "", "secrets", None, n, None, false),
        ("get", "", "secrets", None, n, Some("other"), false),
        ("get", "", "secrets", None, s, Some("alipay"), false),
        ("patch", "", "secrets", None, n, table, false),
        ("update", "", "secrets", None, n, table, false),
        ("delete", "", "secrets", None, n, table, false),
        ("create", "", "secrets", None, n, None, false),
        (
            "get",
            "paynotify.dev",
            "paymentnotifyroutes",
            None,
            s,
            None,
            false,
        ),
        (
            "get",
            "coordination.k8s.io",
            "leases",
            None,
            n,
            Some("paynotify-controller"),
            false,
        ),
        ("list", "", "pods", None, n, None, false),
        ("get", "", "configmaps", None, n, None, false),
    ];
    let controller_checks: &[Check] = &[
        (
            "list",
            "paynotify.dev",
            "paymentnotifyroutes",
            None,
            None,
            None,
            true,
        ),
        (
            "patch",
            "paynotify.dev",
            "paymentnotifyroutes",
            Some("status"),
            s,
            Some("sync"),
            true,
        ),
        (
            "patch",
            "paynotify.dev",
            "paymentnotifyroutes",
            None,
            s,
            Some("sync"),
            false,
        ),
        (
            "update",
            "paynotify.dev",
            "paymentnotifyroutes",
            None,
            s,
            Some("sync"),
            false,
        ),
        (
            "delete",
            "paynotify.dev",
            "paymentnotifyroutes",
            None,
            s,
            Some("sync"),
            false,
        ),
        (
            "create",
            "paynotify.dev",
            "paymentnotifyroutes",
            None,
            s,
            None,
            false,
        ),
        ("get", "", "secrets", None, s, Some("alipay"), true),
        ("patch", "", "secrets", None, s, Some("alipay"), false),
        ("create", "", "secrets", None, s, None, false),
        ("delete", "", "secrets", None, s, Some("alipay"), false),
        ("patch", "", "secrets", None, n, table, true),
        ("patch", "", "secrets", None, n, Some("other"), false),
        ("delete", "", "secrets", None, n, table, false),
        ("create", "events.k8s.io", "events", None, s, None, true),
        ("patch", "events.k8s.io", "events", None, s, None, true),
        ("delete", "events.k8s.io", "events", None, s, None, false),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            None,
            n,
            Some("paynotify-controller"),
            true,
        ),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            None,
            n,
            Some("someone-else"),
            false,
        ),
        (
            "delete",
            "coordination.k8s.io",
            "leases",
            None,
            n,
            Some("paynotify-controller"),
            false,
        ),
        (
            "create",
            "coordination.k8s.io",
            "leases",
            None,
            s,
            None,
            false,
        ),
        (
            "get",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            None,
            None,
            false,
        ),
        ("list", "", "pods", None, n, None, false),
        ("create", "", "pods", None, n, None, false),
    ];
    for (user, checks) in [
        (&ingress_user, ingress_checks),
        (&controller_user, controller_checks),
    ] {
        for (verb, group, resource, sub, namespace, name, expected) in checks {
            let got = allowed(
                &client, user, verb, group, resource, *sub, *namespace, *name,
            )
            .await;
            assert_eq!(
                got,
                *expected,
                "{}: {verb} {group}/{resource}{} {namespace:?}/{name:?}",
                user.0,
                sub.map(|s| format!("/{s}")).unwrap_or_default()
            );
        }
    }
    // And for real: the ingress's own token cannot read a route's key.
    let ingress_client = control_plane::shared()
        .user_client(&ingress_user.0, &["system:serviceaccounts"])
        .await;
    let err = Api::<Secret>::namespaced(ingress_client, &shop)
        .get("alipay")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");

    // Controllers with a broken RBAC, to see the failure metrics the alerts watch: one that
    // cannot write its table Secret, one that cannot read the routes' Secrets.
    let routes_read = json!([
        {"apiGroups": ["paynotify.dev"], "resources": ["paymentnotifyroutes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["paynotify.dev"], "resources": ["paymentnotifyroutes/status"], "verbs": ["patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]);
    let lease = |name: &str| {
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [name], "verbs": ["get", "update", "patch"]},
        ])
    };
    let mut with_secrets = routes_read.clone();
    with_secrets.as_array_mut().unwrap().push(
        json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}),
    );
    let no_table = user_with(
        &client,
        "paynotify-no-table",
        &[
            (shop.as_str(), with_secrets),
            (ns.as_str(), lease("no-table")),
        ],
    )
    .await;
    let table_errors = failing_controller(
        &no_table,
        &ns,
        &shop,
        "no-table",
        &dir,
        "paynotify_controller_table_write_errors_total ",
    )
    .await;
    let mut list_only = routes_read.clone();
    list_only
        .as_array_mut()
        .unwrap()
        .push(json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}));
    let no_secrets = user_with(
        &client,
        "paynotify-no-secrets",
        &[
            (shop.as_str(), list_only),
            (ns.as_str(), lease("no-secrets")),
        ],
    )
    .await;
    let read_errors = failing_controller(
        &no_secrets,
        &ns,
        &shop,
        "no-secrets",
        &dir,
        "paynotify_controller_reconcile_errors_total{reason=\"secret_read\"}",
    )
    .await;

    // Every metric the alerts and the dashboard read is one these binaries export.
    let exported: BTreeSet<String> = [
        &ingress_metrics,
        &controller_metrics,
        &table_errors,
        &read_errors,
    ]
    .iter()
    .flat_map(|m| sample_names(m))
    .collect();
    let mut used = BTreeSet::new();
    for (origin, expr) in shipped_queries() {
        for metric in metrics_in(&expr) {
            assert!(
                exported.contains(&metric),
                "{origin} uses {metric}, which no scrape exported:\n{expr}"
            );
            used.insert(metric);
        }
    }
    // ...and every exported family is on the dashboard or in an alert, but these.
    let unused_on_purpose = [
        "paynotify_build_info",                        // no panel: the version
        "paynotify_unrouted_ack_duration_seconds",     // 404 answers: the count is on the dashboard
        "paynotify_controller_route_reconciles_total", // per-route counts: for ad-hoc queries
    ];
    for family in &exported {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                family
                    .strip_suffix(s)
                    .filter(|b| exported.contains(&format!("{b}_bucket")))
            })
            .unwrap_or(family);
        let covered = used.iter().any(|u| {
            u == family
                || u.strip_suffix("_bucket") == Some(base)
                || u.strip_suffix("_count") == Some(base)
        });
        assert!(
            covered || unused_on_purpose.contains(&base),
            "{family} is exported but neither on the dashboard nor in an alert"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The NATS flags the chart renders run the real ingress against a real JetStream server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_nats_arguments_run_the_real_ingress_on_jetstream() {
    let client = admin().await;
    let server = nats::NatsServer::start("chart");
    let ns = control_plane::unique_namespace("chart-nats").await;
    let shop = control_plane::unique_namespace("chart-nats-shop").await;
    let dir = temp_dir("nats");
    let url = format!("store.nats.url={}", server.url);
    let watch = format!("controller.watchNamespaces={{{shop}}}");
    let objs = install_release(
        &client,
        "jet",
        &ns,
        &[
            "store.type=nats",
            &url,
            "store.nats.replicas=1",
            "store.nats.stream=CHARTTEST",
            &watch,
        ],
    )
    .await;
    let running = start_release(&objs, "jet", &ns, &dir);
    let key = support::test_key();
    put_secret(
        &client,
        &shop,
        "alipay",
        &[("alipay_public_key", key.spki_pem().unwrap().as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &shop,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    let downstream = Downstream::start().await;
    create_route(
        &client,
        &shop,
        route(
            "queued",
            &format!("/notify/{shop}/queued"),
            &downstream.url,
            json!({"mode": "Queued", "timeout": "1s", "retry": {"schedule": ["100ms"]}}),
        ),
    )
    .await;
    let start = Instant::now();
    while http_get(running.admin, "/readyz").await.map(|r| r.0) != Some(200)
        || !http_get(running.admin, "/metrics")
            .await
            .is_some_and(|(_, m)| m.contains(&format!("route=\"{shop}/queued\"")))
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the NATS ingress never served the route\n{}",
            logs(&dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = support::alipay_payment(&key, APP_ID, "CHART-NATS-1");
    assert_eq!(
        post(running.port, &format!("/notify/{shop}/queued"), body).await,
        (200, "success".into()),
        "{}",
        logs(&dir)
    );
    wait(
        "delivery through JetStream",
        Duration::from_secs(30),
        || async { downstream.all().iter().any(|r| r.ok()).then_some(()) },
    )
    .await;
    let event = support::check_webhook(&downstream.all()[0], WEBHOOK_SECRET);
    assert_eq!(event["orderId"], "CHART-NATS-1");
    let routes: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), &shop);
    assert!(routes.get("queued").await.unwrap().name_any() == "queued");
    let _ = std::fs::remove_dir_all(&dir);
}
