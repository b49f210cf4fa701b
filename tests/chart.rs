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
#[path = "support/helmtools.rs"]
mod helmtools;
#[path = "support/nats.rs"]
#[allow(dead_code)] // the three-server cluster is for tests/jetstream.rs
mod nats;
mod support;

use helmtools::helmtool;
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

// ------------------------------------------------------------------------------- README

/// Splits a shell command line into words: whitespace separates, '…' and "…" quote.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// The README's "Install with Helm" section.
fn quickstart_section() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("\n## Install with Helm\n")
        .expect("the README has an \"Install with Helm\" section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_string()
}

/// The shell commands of the quickstart, in order: continuation lines joined, comments and a
/// trailing `&` dropped, each split into words.
fn quickstart_commands() -> Vec<Vec<String>> {
    let section = quickstart_section();
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh || line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let line = line.trim_end();
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let command = std::mem::take(&mut pending);
        let command = command.trim().trim_end_matches('&').trim_end();
        commands.push(shell_words(command));
    }
    commands
}

/// The value after `flag` in a command's words.
fn flag_value<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

/// What the quickstart does, as the tests replay it.
#[derive(Debug)]
struct Quickstart {
    /// `docker build -t IMAGE .`
    image: String,
    release: String,
    namespace: String,
    /// The `--set` values of `helm install`.
    sets: Vec<String>,
    /// The files of `kubectl apply -f`, in order.
    applied: Vec<PathBuf>,
    /// `kubectl -n NS patch pnr NAME --type merge -p JSON`.
    patched: (String, String, Value),
    /// `kubectl -n NS port-forward svc/NAME LOCAL:REMOTE`.
    forwarded: (String, String, u16, u16),
    /// `curl … -H 'content-type: …' --data-binary @FILE http://127.0.0.1:LOCAL/PATH`.
    posted: (String, PathBuf, u16, String),
    /// `kubectl -n NS logs deploy/NAME | grep 'TEXT'`.
    logs: (String, String, String),
    /// The callback URL the README shows for the patched route.
    callback_url: String,
    /// The start of the log line the README shows, up to `event=`.
    logged: String,
}

fn quickstart() -> Quickstart {
    let commands = quickstart_commands();
    let find = |pred: &dyn Fn(&[String]) -> bool, what: &str| -> Vec<String> {
        commands
            .iter()
            .find(|c| pred(c))
            .unwrap_or_else(|| panic!("the quickstart has no {what} command: {commands:?}"))
            .clone()
    };
    let docker = find(
        &|c| c.starts_with(&["docker".into(), "build".into()]),
        "docker build",
    );
    let helm_install = find(
        &|c| c.starts_with(&["helm".into(), "install".into()]),
        "helm install",
    );
    assert_eq!(
        helm_install[3], CHART,
        "helm install installs the chart of this repository"
    );
    let namespace = flag_value(&helm_install, "-n")
        .or_else(|| flag_value(&helm_install, "--namespace"))
        .expect("helm install names its namespace")
        .to_string();
    let sets = helm_install
        .windows(2)
        .filter(|w| w[0] == "--set")
        .map(|w| w[1].clone())
        .collect();
    let applied = commands
        .iter()
        .filter(|c| c.starts_with(&["kubectl".into(), "apply".into()]))
        .flat_map(|c| {
            c.windows(2)
                .filter(|w| w[0] == "-f")
                .map(|w| repo().join(&w[1]))
                .collect::<Vec<_>>()
        })
        .collect();
    let patch = find(&|c| c.contains(&"patch".to_string()), "kubectl patch");
    let pnr = patch.iter().position(|w| w == "patch").unwrap();
    assert_eq!(patch[pnr + 1], "pnr");
    assert_eq!(flag_value(&patch, "--type"), Some("merge"));
    let patched = (
        flag_value(&patch, "-n").unwrap().to_string(),
        patch[pnr + 2].clone(),
        serde_json::from_str(flag_value(&patch, "-p").unwrap()).expect("the patch is JSON"),
    );
    let forward = find(
        &|c| c.contains(&"port-forward".to_string()),
        "kubectl port-forward",
    );
    let at = forward.iter().position(|w| w == "port-forward").unwrap();
    let svc = forward[at + 1]
        .strip_prefix("svc/")
        .expect("svc/NAME")
        .to_string();
    let (local, remote) = forward[at + 2].split_once(':').unwrap();
    let forwarded = (
        flag_value(&forward, "-n").unwrap().to_string(),
        svc,
        local.parse().unwrap(),
        remote.parse().unwrap(),
    );
    let curl = find(&|c| c.first().is_some_and(|w| w == "curl"), "curl");
    let content_type = flag_value(&curl, "-H")
        .and_then(|h| h.strip_prefix("content-type: "))
        .expect("curl sets the content type")
        .to_string();
    let file = flag_value(&curl, "--data-binary")
        .and_then(|f| f.strip_prefix('@'))
        .expect("curl posts a file");
    let url = curl.last().unwrap();
    let (port, path) = url
        .strip_prefix("http://127.0.0.1:")
        .and_then(|r| r.split_once('/'))
        .expect("curl posts to the forwarded port");
    let posted = (
        content_type,
        repo().join(file),
        port.parse().unwrap(),
        format!("/{path}"),
    );
    let logs = find(&|c| c.contains(&"logs".to_string()), "kubectl logs");
    let at = logs.iter().position(|w| w == "logs").unwrap();
    let grep = logs.iter().position(|w| w == "grep").expect("logs | grep");
    let logs = (
        flag_value(&logs, "-n").unwrap().to_string(),
        logs[at + 1]
            .strip_prefix("deploy/")
            .expect("deploy/NAME")
            .to_string(),
        logs[grep + 1].clone(),
    );
    // The line after the `…callbackUrl…` command shows the URL.
    let section = quickstart_section();
    let callback_url = section
        .lines()
        .skip_while(|l| !l.contains(".status.callbackUrl"))
        .nth(1)
        .and_then(|l| {
            l.trim_start_matches(['#', ' ', '→'])
                .split_whitespace()
                .next()
        })
        .expect("the quickstart shows the callback URL")
        .to_string();
    let logged = section
        .lines()
        .skip_while(|l| !l.contains(" logs deploy/"))
        .nth(1)
        .and_then(|l| l.split_once("… "))
        .and_then(|(_, l)| {
            l.split_once("event=")
                .map(|(head, _)| format!("{head}event="))
        })
        .expect("the quickstart shows the log line");
    Quickstart {
        logged,
        image: flag_value(&docker, "-t")
            .expect("docker build -t")
            .to_string(),
        release: helm_install[2].clone(),
        namespace,
        sets,
        applied,
        patched,
        forwarded,
        posted,
        logs,
        callback_url,
    }
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
        // A misspelt hardening field is refused, not silently dropped.
        (
            &["securityContext.readOnlyRootFilesytem=true"][..],
            "additional properties 'readOnlyRootFilesytem' not allowed",
        ),
        (
            &["podSecurityContext.runAsNonRot=true"][..],
            "additional properties 'runAsNonRot' not allowed",
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

/// Where values.yaml documents a key: the comment lines right above it, or its line's own
/// `# …`. Keys inside lists are examples, not values of their own.
fn undocumented_values(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut problems = Vec::new();
    let mut list_indent: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        if let Some(at) = list_indent {
            if indent > at || (indent == at && body.starts_with("- ")) {
                continue;
            }
            list_indent = None;
        }
        if body.starts_with("- ") {
            list_indent = Some(indent);
            continue;
        }
        let Some((key, _)) = body.split_once(':') else {
            continue;
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            continue;
        }
        let inline = line.contains(" # ");
        let above = i > 0 && lines[i - 1].trim_start().starts_with('#');
        if !inline && !above {
            problems.push(format!("line {}: {}", i + 1, line.trim_end()));
        }
    }
    problems
}

/// The keys of the schema's objects that values.yaml does not show (and so does not document).
fn schema_keys_missing(schema: &Value, values: &Value, at: &str, out: &mut Vec<String>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    for (key, sub) in properties {
        let path = format!("{at}{key}");
        match values.get(key) {
            None => out.push(path),
            Some(v) if v.is_object() => schema_keys_missing(sub, v, &format!("{path}."), out),
            Some(_) => {}
        }
    }
}

/// values.yaml describes every key (a comment above it or on its line), and shows every key
/// the schema accepts; the schema refuses keys it does not list (helm lint with the
/// defaults checks that values.yaml has no key the schema lacks).
#[test]
fn every_value_is_documented_and_in_the_schema() {
    let text = std::fs::read_to_string(repo().join("charts/paynotify/values.yaml")).unwrap();
    let problems = undocumented_values(&text);
    assert!(
        problems.is_empty(),
        "values.yaml keys without a comment:\n{}",
        problems.join("\n")
    );
    // The check sees a key without a comment.
    assert_eq!(
        undocumented_values(
            "# a\na: 1\nb:\n  # c\n  c: 2\n  d: 3 # d\nl:\n  - x: 1\n    y: 2\ne: 4\n"
        ),
        ["line 3: b:", "line 7: l:", "line 10: e: 4"]
    );

    let values: Value = serde_yaml::from_str(&text).unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/paynotify/values.schema.json")).unwrap(),
    )
    .unwrap();
    let mut missing = Vec::new();
    schema_keys_missing(&schema, &values, "", &mut missing);
    // Helm's own global values, and Kubernetes fields the schema accepts for a
    // pass-through object that the defaults leave unset.
    missing.retain(|k| {
        k != "global"
            && !k.starts_with("podSecurityContext.")
            && !k.starts_with("securityContext.")
            && !k.ends_with("resources.claims")
    });
    assert!(
        missing.is_empty(),
        "the schema accepts keys values.yaml does not show: {missing:?}"
    );
    // Every object of the schema refuses what it does not list, but the free-form maps
    // (labels, annotations) and Kubernetes objects passed through as they are.
    fn open_objects(schema: &Value, at: &str, out: &mut Vec<String>) {
        if schema["type"] == "object"
            && schema.get("additionalProperties").is_none()
            && schema.get("properties").is_some()
        {
            out.push(at.to_string());
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (key, sub) in properties {
                open_objects(sub, &format!("{at}.{key}"), out);
            }
        }
    }
    let mut open = Vec::new();
    open_objects(&schema, "", &mut open);
    assert!(
        open.is_empty(),
        "objects that accept unknown keys: {open:?}"
    );
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

/// Every RBAC rule the chart renders carries a comment that says why it is needed (the
/// comment lines right above the rule, as `helm template` prints them).
#[test]
fn every_rbac_rule_is_commented() {
    for sets in [&[][..], &["controller.watchNamespaces={shop,billing}"][..]] {
        let mut args = vec!["template", "pn", CHART, "--namespace", "payments"];
        args.extend(set_args(sets));
        let text = helm(&args).unwrap_or_else(|e| panic!("{e}"));
        let mut rules = 0;
        for doc in text.split("\n---") {
            let kind = doc
                .lines()
                .find_map(|l| l.strip_prefix("kind: "))
                .unwrap_or_default();
            if kind != "Role" && kind != "ClusterRole" {
                continue;
            }
            let lines: Vec<&str> = doc.lines().collect();
            let start = lines
                .iter()
                .position(|l| *l == "rules:")
                .unwrap_or_else(|| panic!("{kind} without rules:\n{doc}"));
            for (i, line) in lines.iter().enumerate().skip(start + 1) {
                if !line.trim_start().starts_with("- apiGroups:") {
                    continue;
                }
                rules += 1;
                let above = lines[start + 1..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map_or("", |l| l.trim());
                assert!(
                    above.starts_with('#') && above.len() > 20,
                    "{sets:?}: a {kind} rule without a comment saying why:\n{}\nin\n{doc}",
                    line
                );
            }
        }
        // Controller: routes, status, Secrets, Events (cluster-wide, or in each of the two
        // namespaces), the table Secret, the Lease create and the Lease; ingress: the table
        // Secret.
        let expected = 4 * sets.first().map_or(1, |_| 2) + 3 + 1;
        assert_eq!(rules, expected, "{sets:?}: rules seen");
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

/// The README's quickstart names what the chart renders: its image, Services, ports and
/// Deployments, files that exist, and values the schema accepts. (The steps themselves run
/// against the real binaries in
/// `the_charts_rbac_and_arguments_run_the_real_binaries_and_nothing_more`.)
#[test]
fn the_readme_quickstart_matches_the_chart() {
    let q = quickstart();
    let sets: Vec<&str> = q.sets.iter().map(String::as_str).collect();
    let objs = render(&q.release, &q.namespace, &sets);
    for deployment in all(&objs, "Deployment") {
        assert_eq!(
            container(deployment)["image"],
            q.image.as_str(),
            "the quickstart builds and loads the image the chart runs"
        );
    }
    let (ns, svc, local, remote) = &q.forwarded;
    assert_eq!(ns, &q.namespace);
    let service = find(&objs, "Service", svc);
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["port"], *remote, "port-forward svc/{svc}");
    assert_eq!(
        port["targetPort"], "http",
        "svc/{svc} is the callback Service"
    );
    let (_, file, port, path) = &q.posted;
    assert_eq!(port, local, "curl posts to the forwarded port");
    assert!(file.is_file(), "{}", file.display());
    assert!(path.starts_with("/notify/"), "{path}");
    let (ns, deploy, _) = &q.logs;
    assert_eq!(ns, &q.namespace);
    assert_eq!(
        find(&objs, "Deployment", deploy)["metadata"]["labels"]["app.kubernetes.io/component"],
        "ingress",
        "the log target prints in the ingress's log"
    );
    assert!(q.applied.len() >= 2, "{:?}", q.applied);
    for file in &q.applied {
        assert!(file.is_file(), "{}", file.display());
    }
    // The patched route is one of the applied ones, on the posted path.
    let (ns, name, _) = &q.patched;
    let route = q
        .applied
        .iter()
        .flat_map(|f| parse_documents(&std::fs::read_to_string(f).unwrap()))
        .find(|o| {
            o["kind"] == "PaymentNotifyRoute"
                && o["metadata"]["name"] == name.as_str()
                && o["metadata"]["namespace"] == ns.as_str()
        })
        .unwrap_or_else(|| panic!("no route {ns}/{name} in {:?}", q.applied));
    assert_eq!(route["spec"]["path"], path.as_str());
    let base = sets
        .iter()
        .find_map(|s| s.strip_prefix("controller.publicBaseUrl="))
        .expect("the quickstart sets controller.publicBaseUrl");
    assert_eq!(q.callback_url, format!("{base}{path}"));
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

// ------------------------------------------------------------------------------- image

/// One Dockerfile instruction: its keyword (upper case) and its arguments, continuation
/// lines joined, comments and the parser directive dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let instruction = std::mem::take(&mut pending);
        let (keyword, args) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        out.push((keyword.to_uppercase(), args.trim().to_string()));
    }
    out
}

/// What the image must be for the chart and for Cargo: the facts it is checked against.
struct ImageContract {
    /// Cargo's one binary target of the root package.
    binary: String,
    /// The chart's podSecurityContext.runAsUser and runAsGroup.
    uid: u64,
    gid: u64,
    /// The chart's default callback and admin ports.
    ports: BTreeSet<u64>,
    /// `major.minor` of the Rust toolchain the tests are built with.
    rust: String,
}

/// Everything wrong with a Dockerfile for `contract` (empty: nothing).
fn dockerfile_problems(text: &str, contract: &ImageContract) -> Vec<String> {
    let mut problems = Vec::new();
    let instructions = dockerfile_instructions(text);
    // Stages: (FROM arguments, instructions).
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (keyword, args) in instructions {
        if keyword == "FROM" {
            stages.push((args, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.1.push((keyword, args));
        } else {
            problems.push(format!("{keyword} before the first FROM"));
        }
    }
    if stages.len() < 2 {
        problems.push(format!(
            "not multi-stage: {} FROM instruction(s)",
            stages.len()
        ));
        return problems;
    }
    let bin = &contract.binary;

    // The build stage: the tests' Rust, a locked release build of the one binary.
    let (build_from, build) = &stages[stages.len() - 2];
    let words: Vec<&str> = build_from.split_whitespace().collect();
    let build_name = match words.as_slice() {
        [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
        _ => {
            problems.push(format!("the build stage has no name: FROM {build_from}"));
            String::new()
        }
    };
    if !words[0].starts_with(&format!("rust:{}", contract.rust)) {
        problems.push(format!(
            "the build stage is {}, not Rust {} (the toolchain the tests use)",
            words[0], contract.rust
        ));
    }
    let cargo = build
        .iter()
        .filter(|(k, _)| k == "RUN")
        .find(|(_, a)| a.contains("cargo build"));
    match cargo {
        None => problems.push("the build stage runs no `cargo build`".into()),
        Some((_, run)) => {
            let command: Vec<&str> = run
                .split("cargo build")
                .nth(1)
                .unwrap()
                .split("&&")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            for flag in ["--release", "--locked"] {
                if !command.contains(&flag) {
                    problems.push(format!("`cargo build` without {flag}"));
                }
            }
            let built = command.windows(2).find(|w| w[0] == "--bin").map(|w| w[1]);
            if built != Some(bin.as_str()) {
                problems.push(format!(
                    "`cargo build` builds --bin {built:?}, Cargo's binary is {bin}"
                ));
            }
            if !run.contains(&format!("target/release/{bin}")) {
                problems.push(format!(
                    "target/release/{bin} is not taken out of the build"
                ));
            }
        }
    }

    // The final stage: no shell, the one binary, non-root as the chart runs it.
    let (final_from, last) = &stages[stages.len() - 1];
    let base = final_from.split_whitespace().next().unwrap();
    let shellless = base == "scratch"
        || ((base.starts_with("gcr.io/distroless/")
            || base.starts_with("cgr.dev/chainguard/static"))
            && !base.contains("debug")
            && !base.contains("-dev"));
    if !shellless {
        problems.push(format!(
            "the final base {base} may have a shell: use distroless (not :debug) or scratch"
        ));
    }
    for (keyword, args) in last {
        match keyword.as_str() {
            "RUN" | "SHELL" => problems.push(format!(
                "{keyword} {args} in the final stage: it has no shell to run it"
            )),
            "ADD" => problems.push(format!("ADD {args} in the final stage: COPY the binary")),
            _ => {}
        }
    }
    let copies: Vec<&String> = last
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, a)| a)
        .collect();
    let entrypoint = format!("/{bin}");
    match copies.as_slice() {
        [copy] => {
            let words: Vec<&str> = copy.split_whitespace().collect();
            if !words.contains(&format!("--from={build_name}").as_str()) {
                problems.push(format!(
                    "the final COPY is not from the build stage: {copy}"
                ));
            }
            let paths: Vec<&&str> = words.iter().filter(|w| !w.starts_with("--")).collect();
            match paths.as_slice() {
                [src, dest] if src.ends_with(&format!("/{bin}")) && **dest == entrypoint => {}
                _ => problems.push(format!(
                    "the final COPY must copy the one {bin} binary to {entrypoint}: {copy}"
                )),
            }
        }
        _ => problems.push(format!(
            "the final stage copies {} things, not just the binary",
            copies.len()
        )),
    }
    let last_of = |keyword: &str| {
        last.iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.clone())
    };
    match last_of("USER") {
        None => problems.push("the final stage has no USER: it would run as root".into()),
        Some(user) => {
            let (uid, gid) = user.split_once(':').unwrap_or((&user, ""));
            if uid.parse::<u64>().ok() != Some(contract.uid) || contract.uid == 0 {
                problems.push(format!(
                    "USER {user}: the chart runs as UID {} (podSecurityContext.runAsUser), and \
                     runAsNonRoot needs a numeric non-zero UID",
                    contract.uid
                ));
            }
            if gid.parse::<u64>().ok() != Some(contract.gid) {
                problems.push(format!(
                    "USER {user}: the chart runs as GID {} (podSecurityContext.runAsGroup)",
                    contract.gid
                ));
            }
        }
    }
    let exec_form: Option<Vec<String>> =
        last_of("ENTRYPOINT").and_then(|e| serde_json::from_str(&e).ok());
    if exec_form != Some(vec![entrypoint.clone()]) {
        problems.push(format!(
            "ENTRYPOINT must be [\"{entrypoint}\"] in exec form (the chart passes only args): \
             {:?}",
            last_of("ENTRYPOINT")
        ));
    }
    if let Some(cmd) = last_of("CMD") {
        problems.push(format!(
            "CMD {cmd}: the chart's args replace it; leave it out"
        ));
    }
    let exposed: BTreeSet<u64> = last_of("EXPOSE")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.trim_end_matches("/tcp").parse().ok())
        .collect();
    if exposed != contract.ports {
        problems.push(format!(
            "EXPOSE {exposed:?}: the chart's ports are {:?}",
            contract.ports
        ));
    }
    problems
}

/// `cargo metadata --no-deps` of the workspace in `dir`: its manifests only, no registry.
/// (Targets whose source file is missing are left out, not reported.)
fn cargo_metadata(dir: &Path) -> Result<Value, String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// The source files of the lib, bin and bench targets of a workspace, relative to `dir`:
/// what Cargo needs to build (it refuses to when a declared target's file is missing).
fn build_target_sources(metadata: &Value, dir: &Path) -> BTreeSet<PathBuf> {
    let dir = dir.canonicalize().unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| {
            strings(&t["kind"])
                .iter()
                .any(|k| ["lib", "bin", "bench"].contains(k))
        })
        .map(|t| {
            Path::new(t["src_path"].as_str().unwrap())
                .strip_prefix(&dir)
                .unwrap()
                .to_path_buf()
        })
        .collect()
}

/// The contract as the chart (default values), Cargo and the toolchain state it.
fn image_contract() -> ImageContract {
    let objs = render("pn", "payments", &[]);
    let mut ids = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for deployment in all(&objs, "Deployment") {
        let pod = &deployment["spec"]["template"]["spec"];
        ids.insert((
            pod["securityContext"]["runAsUser"].as_u64().unwrap(),
            pod["securityContext"]["runAsGroup"].as_u64().unwrap(),
        ));
        let c = container(deployment);
        assert!(
            c.get("command").is_none(),
            "{}: the chart relies on the image's ENTRYPOINT",
            deployment["metadata"]["name"]
        );
        for p in c["ports"].as_array().unwrap() {
            ports.insert(p["containerPort"].as_u64().unwrap());
        }
    }
    assert_eq!(ids.len(), 1, "both roles run as one user: {ids:?}");
    let (uid, gid) = ids.into_iter().next().unwrap();

    // Cargo's binary targets of the root package.
    let metadata = cargo_metadata(repo()).unwrap_or_else(|e| panic!("{e}"));
    let root = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["manifest_path"].as_str() == repo().join("Cargo.toml").to_str())
        .expect("the root package");
    let bins: Vec<&str> = root["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| strings(&t["kind"]).contains(&"bin"))
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(bins.len(), 1, "the image holds the single binary: {bins:?}");
    // The binary these tests run is that one.
    assert_eq!(
        Path::new(env!("CARGO_BIN_EXE_paynotify"))
            .file_name()
            .unwrap(),
        bins[0]
    );

    let rustc = Command::new("rustc").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&rustc.stdout).into_owned();
    let rust = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.rsplit_once('.'))
        .map(|(major_minor, _)| major_minor.to_string())
        .unwrap_or_else(|| panic!("rustc --version: {version}"));
    ImageContract {
        binary: bins[0].to_string(),
        uid,
        gid,
        ports,
        rust,
    }
}

/// The Dockerfile cannot be built here (no Docker engine on CI), so what the chart and Cargo
/// need from the image is checked statically: a multi-stage build of Cargo's one binary with
/// the tests' Rust, `--release --locked`; a final stage without a shell holding only that
/// binary, as the chart's numeric non-root user, with the binary as ENTRYPOINT (the chart
/// passes only args) and the chart's ports. The build context that .dockerignore lets through
/// must hold every file the COPY lines name, and be a workspace Cargo can load.
#[test]
fn the_dockerfile_builds_the_image_the_chart_runs() {
    let contract = image_contract();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let problems = dockerfile_problems(&dockerfile, &contract);
    assert!(problems.is_empty(), "Dockerfile:\n{}", problems.join("\n"));

    // Each check can fail: a broken variant is reported.
    for (from, to, expected) in [
        ("USER 65532:65532", "USER nonroot", "numeric non-zero UID"),
        ("USER 65532:65532", "USER 0:0", "runAsUser"),
        ("USER 65532:65532\n", "", "no USER"),
        (
            "gcr.io/distroless/cc-debian12:nonroot",
            "debian:bookworm-slim",
            "may have a shell",
        ),
        (
            "gcr.io/distroless/cc-debian12:nonroot",
            "gcr.io/distroless/cc-debian12:debug-nonroot",
            "may have a shell",
        ),
        (
            "ENTRYPOINT [\"/paynotify\"]",
            "ENTRYPOINT /paynotify",
            "exec form",
        ),
        (
            "ENTRYPOINT [\"/paynotify\"]",
            "ENTRYPOINT [\"/paynotify\", \"ingress\"]",
            "exec form",
        ),
        (
            "ENTRYPOINT [\"/paynotify\"]",
            "ENTRYPOINT [\"/paynotify\"]\nCMD [\"serve\"]",
            "CMD",
        ),
        ("--bin paynotify", "--bin paynotify-bench", "builds --bin"),
        ("--release --locked", "--release", "without --locked"),
        ("rust:1.", "rust:0.", "not Rust"),
        (
            "COPY --from=build /out/paynotify /paynotify",
            "COPY --from=build /out/paynotify /paynotify\nCOPY --from=build /bin/sh /bin/sh",
            "copies 2 things",
        ),
        (
            "EXPOSE 8080 9090",
            "RUN chmod 0555 /paynotify\nEXPOSE 8080 9090",
            "no shell to run it",
        ),
        ("EXPOSE 8080 9090", "EXPOSE 8080", "chart's ports"),
    ] {
        let broken = dockerfile.replacen(from, to, 1);
        assert_ne!(
            broken, dockerfile,
            "{from:?} is not in the Dockerfile: update this test"
        );
        let problems = dockerfile_problems(&broken, &contract);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{from:?} -> {to:?} was not caught (expected {expected:?}): {problems:?}"
        );
    }

    // The build context: .dockerignore is an allow-list (`*`, then `!path` lines).
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        patterns.first(),
        Some(&"*"),
        ".dockerignore starts by excluding everything"
    );
    let allowed: Vec<&str> = patterns[1..]
        .iter()
        .map(|p| {
            let path = p.strip_prefix('!').unwrap_or_else(|| {
                panic!(".dockerignore: {p}: only `!path` lines after `*` (or extend this test)")
            });
            assert!(
                !path.contains(['*', '?', '[']) && !path.starts_with('/'),
                ".dockerignore: {p}: plain relative paths only (or extend this test)"
            );
            path.trim_end_matches('/')
        })
        .collect();
    for kept_out in ["target", ".git", "tests", "examples/keys", "charts"] {
        assert!(
            !allowed
                .iter()
                .any(|a| kept_out == *a || kept_out.starts_with(&format!("{a}/"))),
            "{kept_out} must stay out of the build context"
        );
    }
    // Copy what the build stage's COPY lines take from the context into a directory, as
    // Docker would, and let Cargo load the workspace there.
    let context = support::temp_dir("chart", "docker-context");
    let in_context = |path: &str| {
        allowed
            .iter()
            .any(|a| path == *a || path.starts_with(&format!("{a}/")))
    };
    let mut copied = 0;
    for (keyword, args) in dockerfile_instructions(&dockerfile) {
        if keyword != "COPY" || args.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        let (dest, sources) = words.split_last().unwrap();
        for source in sources {
            let source = source.trim_start_matches("./").trim_end_matches('/');
            assert!(
                in_context(source),
                "COPY {source}: .dockerignore keeps it out of the build context"
            );
            let from = repo().join(source);
            assert!(from.exists(), "COPY {source}: no such file");
            let to = if dest.ends_with('/') && sources.len() > 1 || *dest == "./" {
                context.join(Path::new(source).file_name().unwrap())
            } else {
                context.join(dest.trim_start_matches("./"))
            };
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            let status = Command::new("cp")
                .args(["-r"])
                .arg(&from)
                .arg(&to)
                .status()
                .unwrap();
            assert!(status.success());
            copied += 1;
        }
    }
    assert!(copied >= 3, "only {copied} COPY sources");
    cargo_metadata(&context).unwrap_or_else(|e| {
        panic!("Cargo cannot load the workspace from the image's build context:\n{e}")
    });
    // Every lib, bin and bench target of the workspace has its source in the context
    // (cargo metadata leaves a missing one out silently; cargo build refuses to start).
    let needed = build_target_sources(&cargo_metadata(repo()).unwrap(), repo());
    assert!(needed.contains(Path::new("src/main.rs")), "{needed:?}");
    for source in &needed {
        assert!(
            context.join(source).is_file(),
            "{} is not in the image's build context (a COPY line or .dockerignore)",
            source.display()
        );
    }
    assert!(
        context.join("Cargo.lock").is_file(),
        "--locked needs Cargo.lock"
    );
    let _ = std::fs::remove_dir_all(&context);
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

/// The schema's security contexts list exactly the fields of the apiserver's PodSecurityContext
/// and SecurityContext: no valid field refused, no misspelt one let through.
#[tokio::test]
async fn the_security_context_values_are_the_apiservers_fields() {
    let client = admin().await;
    let request = http::Request::get("/openapi/v3/api/v1")
        .body(Vec::new())
        .unwrap();
    let openapi: Value = client.request(request).await.unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/paynotify/values.schema.json")).unwrap(),
    )
    .unwrap();
    for (value, kind) in [
        (
            "podSecurityContext",
            "io.k8s.api.core.v1.PodSecurityContext",
        ),
        ("securityContext", "io.k8s.api.core.v1.SecurityContext"),
        (
            "securityContext.capabilities",
            "io.k8s.api.core.v1.Capabilities",
        ),
    ] {
        let mut node = &schema;
        for part in value.split('.') {
            node = &node["properties"][part];
        }
        assert_eq!(node["additionalProperties"], false, "{value}");
        let ours: BTreeSet<&String> = node["properties"].as_object().unwrap().keys().collect();
        let theirs: BTreeSet<&String> = openapi["components"]["schemas"][kind]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no {kind} in the apiserver's OpenAPI"))
            .keys()
            .collect();
        assert_eq!(ours, theirs, "{value} vs {kind}");
    }
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
    let (port, admin, controller_admin) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
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
    let admin = support::free_port();
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
    let dir = support::temp_dir("chart", "run");
    // The README quickstart's values, and replay on the admin port.
    let quick = quickstart();
    let mut sets: Vec<&str> = quick.sets.iter().map(String::as_str).collect();
    sets.push("ingress.adminReplay=true");
    let objs = install_release(&client, "run", &ns, &sets).await;
    let running = start_release(&objs, "run", &ns, &dir);

    // Before this test has any route, the ingress turns ready on the controller's first
    // (empty) table: the quickstart's `helm install --wait` ends.
    let start = Instant::now();
    while http_get(running.admin, "/readyz").await.map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the ingress never became ready without routes\n{}",
            logs(&dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

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
    // WeChat Pay APIv3 with a platform certificate (so that the certificate expiry metric is
    // in the scrape the alerts are checked against).
    let wechat_key = support::test_key();
    let certificate = wechat_key.certificate(&[0x5A, 0x01, 0x02]).unwrap();
    let api_v3_key = *b"0123456789abcdef0123456789abcdef";
    put_secret(
        &client,
        &shop,
        "wechat",
        &[
            ("api_v3_key", &api_v3_key),
            ("platform.pem", certificate.as_bytes()),
        ],
    )
    .await;
    create_route(
        &client,
        &shop,
        json!({
            "apiVersion": "paynotify.dev/v1alpha1",
            "kind": "PaymentNotifyRoute",
            "metadata": {"name": "wechat"},
            "spec": {
                "path": format!("/notify/{shop}/wechat"),
                "provider": {"wechatPayV3": {"mchId": "1900000001",
                    "apiV3Key": {"secretKeyRef": {"name": "wechat", "key": "api_v3_key"}},
                    "platformCertificates": [{"secretKeyRef": {"name": "wechat", "key": "platform.pem"}}]}},
                "targets": [{"url": ok.url}],
                "delivery": {"mode": "Synchronous", "timeout": "3s"},
                "signing": {"secret": {"secretKeyRef": {"name": "webhook", "key": "secret"}}}
            }
        }),
    )
    .await;

    // The README quickstart: the example namespace, Secrets and routes applied as they are,
    // then its patch of one route to the log target.
    let mut quick_routes = Vec::new();
    for file in &quick.applied {
        for obj in parse_documents(&std::fs::read_to_string(file).unwrap()) {
            apply(&client, &ns, &obj, false)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if obj["kind"] == "PaymentNotifyRoute" {
                quick_routes.push((
                    obj["metadata"]["namespace"].as_str().unwrap().to_string(),
                    obj["metadata"]["name"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    assert!(!quick_routes.is_empty(), "{:?}", quick.applied);
    let (quick_ns, quick_name, quick_patch) = &quick.patched;
    Api::<PaymentNotifyRoute>::namespaced(client.clone(), quick_ns)
        .patch(
            quick_name,
            &PatchParams::default(),
            &Patch::Merge(quick_patch),
        )
        .await
        .unwrap_or_else(|e| panic!("the quickstart's patch: {e}"));

    let mut all_routes = vec![
        (shop.clone(), "sync".to_string()),
        (shop.clone(), "queued".to_string()),
        (shop.clone(), "wechat".to_string()),
    ];
    all_routes.extend(quick_routes.iter().cloned());
    for (route_ns, name) in &all_routes {
        let start = Instant::now();
        while !ready(&client, route_ns, name).await {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "route {route_ns}/{name} never became Ready with the chart's RBAC\n{}",
                logs(&dir)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Served: every route, and the patched one with its log target.
    let start = Instant::now();
    while http_get(running.admin, "/readyz").await.map(|r| r.0) != Some(200)
        || !http_get(running.admin, "/metrics")
            .await
            .is_some_and(|(_, m)| {
                all_routes
                    .iter()
                    .all(|(n, r)| m.contains(&format!("route=\"{n}/{r}\"")))
                    && m.lines().any(|l| {
                        l.starts_with("paynotify_deliveries_total{")
                            && l.contains(&format!("route=\"{quick_ns}/{quick_name}\""))
                            && l.contains("target=\"log\"")
                    })
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

    // WeChat Pay APIv3, verified with the platform certificate picked by its serial.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (headers, body) = support::wechat_v3_request(
        &wechat_key,
        "5A0102",
        &api_v3_key,
        &support::v3_transaction("1900000001", "CHART-V3"),
        "TRANSACTION.SUCCESS",
        now,
    );
    let answer = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/notify/{shop}/wechat",
            running.port
        ))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 204, "{}", logs(&dir));
    assert_eq!(ok.count(), 2);
    let event = support::check_webhook(&ok.all()[1], WEBHOOK_SECRET);
    assert_eq!(event["orderId"], "CHART-V3");

    // The quickstart's signed sample, posted as its curl does: success, and the event in the
    // ingress's log (its `kubectl logs … | grep`).
    let (content_type, file, _, path) = &quick.posted;
    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}{path}", running.port))
        .header("content-type", content_type)
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        (answer.status().as_u16(), answer.text().await.unwrap()),
        (200, "success".to_string()),
        "{}",
        logs(&dir)
    );
    let grep = &quick.logs.2;
    let line = wait(
        "the quickstart's event in the log",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(dir.join("ingress.log"))
                .ok()?
                .lines()
                .find(|l| l.contains(grep.as_str()) && l.contains("DEMO-ORDER-0001"))
                .map(str::to_string)
        },
    )
    .await;
    assert!(
        line.contains(&quick.logged),
        "{line}\nis not what the README shows:\n{}",
        quick.logged
    );
    let (_, event) = line.split_once(&quick.logged).unwrap();
    let event: Value = serde_json::from_str(event).expect("the logged event is JSON");
    assert_eq!(event["route"], format!("{quick_ns}/{quick_name}"));
    assert_eq!(event["orderId"], "DEMO-ORDER-0001");
    let route = Api::<PaymentNotifyRoute>::namespaced(client.clone(), quick_ns)
        .get(quick_name)
        .await
        .unwrap();
    assert_eq!(
        route.status.and_then(|s| s.callback_url).as_deref(),
        Some(quick.callback_url.as_str()),
        "the callback URL the quickstart shows"
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
    // The certificate's expiry (notAfter 2040-01-01), for the certificate alerts.
    assert!(
        ingress_metrics.lines().any(|l| {
            l.starts_with("paynotify_certificate_not_after_timestamp_seconds{")
                && l.contains(&format!("route=\"{shop}/wechat\""))
                && l.contains("provider=\"wechatpay-v3\"")
                && l.contains("serial=\"5A0102\"")
                && l.ends_with(" 2208988800")
        }),
        "{ingress_metrics}"
    );
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
    let dir = support::temp_dir("chart", "nats");
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
