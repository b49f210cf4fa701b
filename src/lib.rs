//! paynotify: a verifying ingress for Alipay and WeChat Pay payment notifications.
pub mod config;
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
