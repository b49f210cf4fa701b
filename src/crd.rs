//! The `PaymentNotifyRoute` custom resource (`paynotify.dev/v1alpha1`): the shared
//! [`RouteSpec`] with keys taken from Secrets in the route's own namespace, its status, and
//! the generated CRD with the CEL rules that refuse bad routes at admission.

use crate::spec::RouteSpec;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::core::{NamespaceResourceScope, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::borrow::Cow;

/// API group.
pub const GROUP: &str = "paynotify.dev";
/// API version.
pub const VERSION: &str = "v1alpha1";
/// Kind.
pub const KIND: &str = "PaymentNotifyRoute";
/// Plural resource name.
pub const PLURAL: &str = "paymentnotifyroutes";

/// A key in a Secret of the route's own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeySource {
    /// The Secret and the key in it.
    pub secret_key_ref: SecretKeySelector,
}

/// A Secret's name and one of its keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretKeySelector {
    /// The Secret's name (in the route's namespace).
    pub name: String,
    /// The key within the Secret's data.
    pub key: String,
}

/// The route's spec: the standalone config's route, with keys from Secrets.
pub type PaymentNotifyRouteSpec = RouteSpec<SecretKeySource>;

/// What the controller last found about a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentNotifyRouteStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `KeysResolved` and `PathAccepted`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The platform (`alipay`, `wechatpay-v2`, `wechatpay-v3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The URL to give the platform, when the ingress's public base URL is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Fingerprints of the keys in use, and certificate facts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyStatus>,
}

/// One key the route verifies with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// The spec field the key came from.
    pub field: String,
    /// `SHA256:<hex>` of the key (asymmetric keys) or a short hash (symmetric keys).
    pub fingerprint: String,
    /// The certificate serial (upper-case hex) or WeChat Pay public-key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Alipay `alipay_cert_sn` of a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sn: Option<String>,
    /// Certificate expiry (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

/// A `PaymentNotifyRoute` object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentNotifyRoute {
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The route.
    pub spec: PaymentNotifyRouteSpec,
    /// Set by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PaymentNotifyRouteStatus>,
}

impl Serialize for PaymentNotifyRoute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut obj = s.serialize_struct(KIND, 4 + usize::from(self.status.is_some()))?;
        obj.serialize_field("apiVersion", &format!("{GROUP}/{VERSION}"))?;
        obj.serialize_field("kind", KIND)?;
        obj.serialize_field("metadata", &self.metadata)?;
        obj.serialize_field("spec", &self.spec)?;
        if let Some(status) = &self.status {
            obj.serialize_field("status", status)?;
        }
        obj.end()
    }
}

impl PaymentNotifyRoute {
    /// A route object named `name` with `spec`.
    pub fn new(name: &str, spec: PaymentNotifyRouteSpec) -> Self {
        PaymentNotifyRoute {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec,
            status: None,
        }
    }
}

impl Resource for PaymentNotifyRoute {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The OpenAPI schema of `T` in the structural form CRDs require (no `$ref`, nullable
/// instead of `anyOf null`), as kube-derive makes it.
fn structural_schema<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .with_transform(kube::core::schema::OptionalEnum)
        .into_generator();
    serde_json::to_value(generator.into_root_schema_for::<T>()).unwrap_or(Value::Null)
}

/// One CEL rule with a message a human can act on.
fn rule(rule: &str, message: &str) -> Value {
    json!({"rule": rule, "message": message})
}

/// Adds `rules` to the schema node at `path` (object property names).
fn add_rules(schema: &mut Value, path: &[&str], rules: Vec<Value>) {
    let mut node = schema;
    for p in path {
        node = &mut node["properties"][*p];
    }
    match node
        .get_mut("x-kubernetes-validations")
        .and_then(Value::as_array_mut)
    {
        Some(existing) => existing.extend(rules),
        None => node["x-kubernetes-validations"] = Value::Array(rules),
    }
}

/// Sets `key` (maxLength, maxItems…) on the schema node at `path`.
fn limit(schema: &mut Value, path: &[&str], key: &str, value: u64) {
    let mut node = schema;
    for p in path {
        node = &mut node["properties"][*p];
    }
    node[key] = json!(value);
}

const DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// The spec schema with the admission rules.
fn spec_schema() -> Value {
    let mut spec = structural_schema::<PaymentNotifyRouteSpec>();
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("title");
        obj.remove("description");
    }
    add_rules(
        &mut spec,
        &["path"],
        vec![
            rule(
                "self.startsWith('/')",
                "path must start with / (for example /notify/shop/alipay)",
            ),
            rule("!self.contains('..')", "path must not contain .."),
            rule(
                "!self.contains('?') && !self.contains('#')",
                "path must not carry a query or fragment: the platforms refuse notify URLs with parameters",
            ),
            rule(
                "!self.contains(' ') && !self.contains('%')",
                "path must not contain spaces or %-escapes",
            ),
        ],
    );
    add_rules(
        &mut spec,
        &["provider"],
        vec![rule(
            "[has(self.alipay), has(self.wechatPayV2), has(self.wechatPayV3)].filter(x, x).size() == 1",
            "set exactly one of provider.alipay, provider.wechatPayV2 or provider.wechatPayV3",
        )],
    );
    add_rules(
        &mut spec,
        &["provider", "wechatPayV3"],
        vec![
            rule(
                "(has(self.platformCertificates) && size(self.platformCertificates) > 0) || has(self.publicKey)",
                "give provider.wechatPayV3.platformCertificates, publicKey, or both",
            ),
            rule(
                &format!("!has(self.maxClockSkew) || self.maxClockSkew.matches(r'{DURATION}')"),
                "maxClockSkew must be a duration like 30s or 5m",
            ),
        ],
    );
    add_rules(
        &mut spec,
        &["provider", "wechatPayV3", "publicKey"],
        vec![rule(
            "self.id.startsWith('PUB_KEY_ID_')",
            "publicKey.id must start with PUB_KEY_ID_",
        )],
    );
    // Bounds keep every rule within the apiserver's CEL cost budget.
    limit(&mut spec, &["path"], "maxLength", 512);
    limit(&mut spec, &["targets"], "maxItems", 16);
    limit(
        &mut spec,
        &["provider", "wechatPayV3", "platformCertificates"],
        "maxItems",
        8,
    );
    limit(
        &mut spec,
        &["provider", "wechatPayV3", "maxClockSkew"],
        "maxLength",
        32,
    );
    limit(
        &mut spec,
        &["provider", "wechatPayV3", "publicKey", "id"],
        "maxLength",
        128,
    );
    limit(&mut spec, &["delivery", "timeout"], "maxLength", 32);
    let target = &mut spec["properties"]["targets"]["items"];
    target["properties"]["url"]["maxLength"] = json!(2048);
    target["x-kubernetes-validations"] = json!([
        rule(
            "[has(self.url), has(self.service), has(self.log)].filter(x, x).size() == 1",
            "each target needs exactly one of url, service or log",
        ),
        rule(
            "!has(self.url) || self.url.startsWith('http://') || self.url.startsWith('https://')",
            "target urls must be http:// or https://",
        ),
    ]);
    add_rules(
        &mut spec,
        &["targets"],
        vec![rule("size(self) > 0", "give at least one target")],
    );
    limit(
        &mut spec,
        &["delivery", "retry", "schedule"],
        "maxItems",
        32,
    );
    spec["properties"]["delivery"]["properties"]["retry"]["properties"]["schedule"]["items"]["maxLength"] =
        json!(32);
    add_rules(
        &mut spec,
        &["delivery"],
        vec![
            rule(
                &format!("!has(self.timeout) || self.timeout.matches(r'{DURATION}')"),
                "delivery.timeout must be a duration like 500ms or 3s",
            ),
            rule(
                &format!(
                    "!has(self.retry) || self.retry.schedule.all(d, d.matches(r'{DURATION}'))"
                ),
                "delivery.retry.schedule entries must be durations like 15s or 3h",
            ),
        ],
    );
    spec
}

/// The status schema, with conditions as a map keyed by type.
fn status_schema() -> Value {
    let mut status = structural_schema::<PaymentNotifyRouteStatus>();
    if let Some(obj) = status.as_object_mut() {
        obj.remove("title");
        obj.remove("description");
    }
    let conditions = &mut status["properties"]["conditions"];
    conditions["x-kubernetes-list-type"] = json!("map");
    conditions["x-kubernetes-list-map-keys"] = json!(["type"]);
    status
}

fn printer_column(name: &str, kind: &str, path: &str) -> apiext::CustomResourceColumnDefinition {
    apiext::CustomResourceColumnDefinition {
        name: name.into(),
        type_: kind.into(),
        json_path: path.into(),
        ..Default::default()
    }
}

/// The CustomResourceDefinition, generated from the Rust types.
pub fn crd() -> apiext::CustomResourceDefinition {
    let schema = json!({
        "type": "object",
        "description": "A payment notification route: the callback path a platform posts to, the keys that verify it, and where verified events go.",
        "required": ["spec"],
        "properties": {
            "spec": spec_schema(),
            "status": status_schema(),
        }
    });
    apiext::CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{PLURAL}.{GROUP}")),
            ..Default::default()
        },
        spec: apiext::CustomResourceDefinitionSpec {
            group: GROUP.into(),
            names: apiext::CustomResourceDefinitionNames {
                kind: KIND.into(),
                list_kind: Some(format!("{KIND}List")),
                plural: PLURAL.into(),
                singular: Some("paymentnotifyroute".into()),
                short_names: Some(vec!["pnr".into()]),
                categories: Some(vec!["paynotify".into()]),
            },
            scope: "Namespaced".into(),
            versions: vec![apiext::CustomResourceDefinitionVersion {
                name: VERSION.into(),
                served: true,
                storage: true,
                additional_printer_columns: Some(vec![
                    printer_column("Provider", "string", ".status.provider"),
                    printer_column("Path", "string", ".spec.path"),
                    printer_column(
                        "Ready",
                        "string",
                        ".status.conditions[?(@.type==\"Ready\")].status",
                    ),
                    printer_column("Age", "date", ".metadata.creationTimestamp"),
                ]),
                schema: Some(apiext::CustomResourceValidation {
                    // A JSON value built above always deserializes into JSONSchemaProps.
                    open_api_v3_schema: serde_json::from_value(schema).ok(),
                }),
                subresources: Some(apiext::CustomResourceSubresources {
                    status: Some(apiext::CustomResourceSubresourceStatus(json!({}))),
                    scale: None,
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// The CRD as YAML, as `paynotify crd` prints it and `crds/` commits it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}
