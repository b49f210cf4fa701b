//! The CRD is generated from the Rust types; the committed copy must match.

use paynotify::crd;

#[test]
fn committed_crd_matches_the_generated_one() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/paymentnotifyroutes.paynotify.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == crd::crd_yaml().unwrap(),
        "crds/ is stale: run `cargo run -- crd > crds/paymentnotifyroutes.paynotify.dev.yaml`"
    );
}

#[test]
fn crd_shape() {
    let crd = serde_json::to_value(crd::crd()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "paynotify.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["pnr"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Provider", "Path", "Ready", "Age"]);
    let schema = &version["schema"]["openAPIV3Schema"];
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let props = &schema["properties"]["spec"]["properties"];
    for field in ["path", "provider", "targets", "delivery", "signing"] {
        assert!(props[field].is_object(), "spec.{field}");
    }
    for rules_at in [
        &props["path"],
        &props["provider"],
        &props["targets"],
        &props["delivery"],
    ] {
        assert!(
            !rules_at["x-kubernetes-validations"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
    // Keys come only from Secrets in the route's namespace: no namespace field, no file/env.
    let key = &props["signing"]["properties"]["secret"];
    assert_eq!(key["required"], serde_json::json!(["secretKeyRef"]));
    assert!(
        key["properties"]["secretKeyRef"]["properties"]
            .get("namespace")
            .is_none()
    );
    assert!(key["properties"].get("file").is_none());
}
