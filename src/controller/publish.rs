//! The compiled routing table as a Secret: what the controller writes and the cluster
//! ingress reads. Building and comparing are pure; the controller does the IO.

use crate::table::{ResolvedRoute, TableDocument};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// The key of the table document in the Secret's data.
pub const TABLE_KEY: &str = "table.json";

/// Why a table Secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TableReadError {
    /// No `table.json` key.
    #[error("the Secret has no {TABLE_KEY} key")]
    Missing,
    /// The document does not parse.
    #[error("{TABLE_KEY} does not parse: {0}")]
    Parse(#[from] serde_json::Error),
}

/// The Secret holding `doc`.
pub fn table_secret(
    name: &str,
    namespace: &str,
    doc: &TableDocument,
) -> Result<Secret, serde_json::Error> {
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "paynotify".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "routing-table".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "paynotify-controller".to_string(),
        ),
    ]);
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TABLE_KEY.to_string(),
            ByteString(serde_json::to_vec(doc)?),
        )])),
        ..Default::default()
    })
}

/// The document stored in a table Secret.
pub fn read_table(secret: &Secret) -> Result<TableDocument, TableReadError> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TABLE_KEY))
        .ok_or(TableReadError::Missing)?;
    Ok(serde_json::from_slice(&bytes.0)?)
}

/// The next document to publish, or `None` when `routes` are what `current` already holds
/// (so that nothing is written and the generation does not move).
pub fn next_document(
    current: Option<&TableDocument>,
    mut routes: Vec<ResolvedRoute>,
) -> Option<TableDocument> {
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    match current {
        Some(doc) if doc.routes == routes => None,
        _ => Some(TableDocument {
            generation: current.map_or(0, |d| d.generation) + 1,
            routes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> ResolvedRoute {
        let text = format!(
            r#"{{"name":"{name}","spec":{{"path":"/{name}","provider":{{"wechatPayV2":{{"appId":"wx","mchId":"1","signType":"MD5","apiKey":"{k}"}}}},"targets":[{{"log":{{}}}}],"signing":{{"secret":"{k}"}}}}}}"#,
            k = crate::crypto::base64_encode(b"0123456789abcdefghijklmnopqrstuv")
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn writes_only_changes_and_counts_generations() {
        let first = next_document(None, vec![route("b"), route("a")]).unwrap();
        assert_eq!(first.generation, 1);
        assert_eq!(
            first
                .routes
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(next_document(Some(&first), vec![route("a"), route("b")]).is_none());
        let second = next_document(Some(&first), vec![route("a")]).unwrap();
        assert_eq!(second.generation, 2);
        let secret = table_secret("paynotify-routing-table", "paynotify", &second).unwrap();
        assert_eq!(read_table(&secret).unwrap(), second);
    }
}
