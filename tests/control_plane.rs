//! The Kubernetes control-plane harness (tests/support/control_plane.rs) against a real
//! kube-apiserver v1.37.2 and etcd: version, CRUD, RBAC denial for a least-privileged user,
//! and one control plane shared by all tests of the binary. See docs/envtest.md.

#[path = "support/control_plane.rs"]
mod control_plane;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use std::collections::BTreeMap;

/// Every test checks this: one control plane per test binary, whichever test came first.
fn assert_shared(plane: &control_plane::ControlPlane) {
    assert_eq!(
        control_plane::starts(),
        1,
        "the control plane was started more than once"
    );
    assert!(std::ptr::eq(plane, control_plane::shared()));
    // Exactly one kube-apiserver and one etcd are children of this process.
    let (apiserver, etcd) = plane.pids();
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid: u32 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
        if ppid == std::process::id() {
            let pid: u32 = head.split_once(" (").unwrap().0.parse().unwrap();
            children.push((pid, head.split_once(" (").unwrap().1.to_string()));
        }
    }
    children.sort();
    let mut expected = vec![
        (apiserver, "kube-apiserver".to_string()),
        (etcd, "etcd".to_string()),
    ];
    expected.sort();
    assert_eq!(children, expected, "children of the test process");
}

#[tokio::test]
async fn apiserver_reports_v1_37_2() {
    let plane = control_plane::shared();
    assert_shared(plane);
    let info = plane.client().await.apiserver_version().await.unwrap();
    assert_eq!(info.git_version, "v1.37.2");
    assert_eq!((info.major.as_str(), info.minor.as_str()), ("1", "37"));
    assert!(plane.api_url().starts_with("https://127.0.0.1:"));
    assert!(plane.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(plane.kubeconfig_path().is_file());
}

#[tokio::test]
async fn namespace_and_secret_round_trip() {
    let plane = control_plane::shared();
    assert_shared(plane);
    let client = plane.client().await;
    let ns = plane.unique_namespace("round-trip").await;
    let got = Api::<Namespace>::all(client.clone())
        .get(&ns)
        .await
        .unwrap();
    assert_eq!(got.metadata.name.as_deref(), Some(ns.as_str()));

    let secrets = Api::<Secret>::namespaced(client, &ns);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("alipay-keys".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "app_private_key.pem".to_string(),
            ByteString(b"not really a key".to_vec()),
        )])),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let read = secrets.get("alipay-keys").await.unwrap();
    assert_eq!(read.data, secret.data);
    assert_eq!(read.type_.as_deref(), Some("Opaque"));
    let listed = secrets.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
}

#[tokio::test]
async fn least_privileged_user_is_forbidden_to_list_secrets() {
    let plane = control_plane::shared();
    assert_shared(plane);
    let ns = plane.unique_namespace("rbac").await;
    let user = plane
        .user_client(
            "system:serviceaccount:paynotify:operator",
            &["paynotify-testers"],
        )
        .await;
    // Authenticated (the apiserver's public-info role lets anyone read /version)...
    assert_eq!(
        user.apiserver_version().await.unwrap().git_version,
        "v1.37.2"
    );
    // ...but without any RBAC binding.
    let err = Api::<Secret>::namespaced(user.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect_err("a user without RBAC grants must not list secrets");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("User \"system:serviceaccount:paynotify:operator\" cannot list"),
                "{status:?}"
            );
        }
        other => panic!("expected a 403 Forbidden, got {other}"),
    }
    // Same for the cluster-wide list.
    let err = Api::<Secret>::all(user).list(&ListParams::default()).await;
    assert!(matches!(err, Err(kube::Error::Api(s)) if s.code == 403));
}

/// The two groups of a minted certificate both reach the apiserver: a RoleBinding to the
/// second group grants what the user lacked.
#[tokio::test]
async fn minted_groups_reach_rbac() {
    use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
    let plane = control_plane::shared();
    assert_shared(plane);
    let admin = plane.client().await;
    let ns = plane.unique_namespace("groups").await;
    let role = Role {
        metadata: ObjectMeta {
            name: Some("secret-reader".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["list".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("secret-readers".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "secret-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "Group".into(),
            name: "second-group".into(),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let reader = plane
        .user_client("reader", &["first-group", "second-group"])
        .await;
    let reader_secrets = Api::<Secret>::namespaced(reader, &ns);
    // The RBAC authorizer sees new bindings through an informer: allow it a moment.
    let mut tries = 0;
    let listed = loop {
        match reader_secrets.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) if s.code == 403 && tries < 50 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert!(listed.items.is_empty());
    let outsider = plane.user_client("outsider", &["first-group"]).await;
    let err = Api::<Secret>::namespaced(outsider, &ns)
        .list(&ListParams::default())
        .await;
    assert!(matches!(err, Err(kube::Error::Api(s)) if s.code == 403));
}

/// What an apiserver-only control plane does not do: without kube-controller-manager's
/// namespace controller, a deleted namespace stays `Terminating` (tests must not wait for
/// namespace deletion or garbage collection).
#[tokio::test]
async fn deleted_namespaces_stay_terminating() {
    let plane = control_plane::shared();
    assert_shared(plane);
    let namespaces = Api::<Namespace>::all(plane.client().await);
    let ns = plane.unique_namespace("deleted").await;
    namespaces
        .delete(&ns, &kube::api::DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let still = namespaces.get(&ns).await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    assert_eq!(
        still.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
}
