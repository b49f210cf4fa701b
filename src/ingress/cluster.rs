//! `paynotify ingress`: the cluster ingress. It reads the compiled table Secret by name —
//! `get`, then `watch` with a name field selector, which RBAC can grant on that one name —
//! and swaps the routing table atomically on every change. A table that does not load is
//! counted and logged; the last good one keeps serving.

use super::Ingress;
use crate::controller::publish;
use crate::table;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// Where the table Secret is.
#[derive(Debug, Clone)]
pub struct TableSource {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Loads one table Secret into `ingress`, unless it is the generation already served.
pub fn load(ingress: &Ingress, secret: &Secret) {
    let compiled = publish::read_table(secret)
        .map_err(|e| e.to_string())
        .and_then(|doc| table::compile(&doc).map_err(|e| e.to_string()));
    match compiled {
        Ok(table) if ingress.is_loaded() && table.generation == ingress.table().generation => {}
        Ok(table) => {
            let (generation, routes) = (table.generation, table.len());
            ingress.install(table);
            ingress.metrics.reloads.inc();
            tracing::info!(generation, routes, "routing table loaded");
        }
        Err(e) => {
            ingress.metrics.reload_errors.inc();
            tracing::error!(error = %e, "routing table refused; the previous table keeps serving");
        }
    }
}

/// Follows the table Secret forever: get, then watch from its resourceVersion; on any watch
/// error or expiry, get again.
pub async fn follow(client: Client, source: TableSource, ingress: Arc<Ingress>) {
    let api: Api<Secret> = Api::namespaced(client, &source.namespace);
    let mut delay = Duration::from_millis(500);
    loop {
        let secret = match api.get_opt(&source.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                tracing::warn!(secret = %source.name, "routing table Secret does not exist yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routing table Secret");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        delay = Duration::from_millis(500);
        load(&ingress, &secret);
        let mut version = secret.resource_version().unwrap_or_default();
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", source.name))
            .timeout(290);
        let mut stream = match api.watch(&params, &version).await {
            Ok(s) => s.boxed(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the routing table Secret");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(s) | WatchEvent::Modified(s)) => {
                    version = s.resource_version().unwrap_or(version);
                    load(&ingress, &s);
                }
                Ok(WatchEvent::Deleted(_)) => {
                    tracing::warn!("routing table Secret deleted; the last table keeps serving");
                }
                Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                Ok(WatchEvent::Error(status)) => {
                    tracing::debug!(code = status.code, "watch ended; reading the Secret again");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch stream error; reading the Secret again");
                    break;
                }
            }
        }
    }
}
