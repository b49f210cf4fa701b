//! paynotify: a verifying ingress for Alipay and WeChat Pay payment notifications.
//!
//! A notification travels one path: the [`ingress`] looks up the route by exact path in the
//! compiled [`table`], reads the body under a size cap, and hands it to the route's pure
//! [`provider`] adapter, which parses, authenticates (with [`crypto`] and [`keys`]), checks
//! the route's policy and normalizes it into an [`event`]. The [`delivery`] layer drops
//! duplicates and POSTs the signed event to every target; only then does the platform get its
//! success answer. Routes are written once as a [`spec`], read from a file by [`config`] (or,
//! in a cluster, from custom resources), and compiled by a pure step shared by every mode.
//! [`inspect`] replays one captured notification through the same adapters to explain a
//! verdict.

pub mod config;
pub mod controller;
pub mod crd;
pub mod crypto;
pub mod delivery;
pub mod event;
pub mod ingress;
pub mod inspect;
pub mod keys;
pub mod provider;
#[cfg(feature = "signer")]
pub mod signer;
pub mod spec;
pub mod table;
