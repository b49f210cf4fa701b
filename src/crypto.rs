//! Verification primitives: RSA PKCS#1 v1.5, HMAC, MD5, AES decryption, constant-time compare.
//!
//! RSA, HMAC, SHA and AES-GCM go through `aws-lc-rs` (the hot path's largest cost, measured
//! in architecture.md §3); MD5 and AES-256-ECB use RustCrypto crates because `aws-lc-rs`
//! does not expose them.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, KeyInit};
use aws_lc_rs::{aead, digest, hmac, signature};
use base64::Engine;
use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// Hash used inside an RSA PKCS#1 v1.5 signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaHash {
    /// SHA-1 (Alipay `RSA`).
    Sha1,
    /// SHA-256 (Alipay `RSA2`, WeChat Pay APIv3).
    Sha256,
}

impl RsaHash {
    /// The Java-style algorithm name shown to humans.
    pub fn algorithm_name(self) -> &'static str {
        match self {
            RsaHash::Sha1 => "SHA1withRSA (RSASSA-PKCS1-v1_5)",
            RsaHash::Sha256 => "SHA256withRSA (RSASSA-PKCS1-v1_5)",
        }
    }

    fn params(self) -> &'static signature::RsaParameters {
        match self {
            // Legacy Alipay `RSA` keys may be 1024 bits; the key parser enforces sizes per use.
            RsaHash::Sha1 => &signature::RSA_PKCS1_1024_8192_SHA1_FOR_LEGACY_USE_ONLY,
            RsaHash::Sha256 => &signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
        }
    }

    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            RsaHash::Sha1 => &[
                0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
                0x14,
            ],
            RsaHash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
        }
    }

    fn digest(self, message: &[u8]) -> Vec<u8> {
        let alg = match self {
            RsaHash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            RsaHash::Sha256 => &digest::SHA256,
        };
        digest::digest(alg, message).as_ref().to_vec()
    }
}

/// An RSA public key parsed once, ready to verify many signatures with one hash.
pub struct RsaVerifier {
    key: signature::ParsedPublicKey,
    hash: RsaHash,
}

impl std::fmt::Debug for RsaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaVerifier")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl RsaVerifier {
    /// Parses a DER SubjectPublicKeyInfo for verification with `hash`.
    pub fn new(spki_der: &[u8], hash: RsaHash) -> Result<Self, String> {
        let key = signature::ParsedPublicKey::new(hash.params(), spki_der)
            .map_err(|e| format!("the RSA key was refused by the verifier: {e}"))?;
        Ok(RsaVerifier { key, hash })
    }

    /// The hash this verifier checks.
    pub fn hash(&self) -> RsaHash {
        self.hash
    }

    /// True when `sig` is a valid PKCS#1 v1.5 signature of `message`.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        self.key.verify_sig(message, sig).is_ok()
    }
}

/// What the raw RSA public operation says about a signature that failed to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RsaDiagnosis {
    /// The signature verifies (nothing to explain).
    Valid,
    /// The signature's length is not the key's modulus length.
    WrongLength {
        /// Bytes in the signature.
        got: usize,
        /// Bytes in the modulus.
        want: usize,
    },
    /// No valid PKCS#1 v1.5 block came out: the signature was made by another key.
    WrongKey,
    /// The key made the signature with the expected hash, but over different bytes.
    ContentChanged,
    /// The key made the signature, but with another hash (another sign type).
    OtherHash(RsaHash),
}

/// Explains why `sig` does not verify, using the RSA public operation (diagnostics only:
/// the hot path never calls this).
pub fn diagnose_rsa(spki_der: &[u8], hash: RsaHash, message: &[u8], sig: &[u8]) -> RsaDiagnosis {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    if RsaVerifier::new(spki_der, hash).is_ok_and(|v| v.verify(message, sig)) {
        return RsaDiagnosis::Valid;
    }
    let Ok(key) = rsa::PublicKey::from_public_key_der(spki_der) else {
        return RsaDiagnosis::WrongKey;
    };
    let k = key.size();
    if sig.len() != k {
        return RsaDiagnosis::WrongLength {
            got: sig.len(),
            want: k,
        };
    }
    let m = rsa::BoxedUint::from_be_slice(sig, key.n().bits_precision());
    let Ok(m) = m else {
        return RsaDiagnosis::WrongKey;
    };
    let Ok(em) = rsa::hazmat::rsa_encrypt(&key, &m) else {
        return RsaDiagnosis::WrongKey;
    };
    let em = em.to_be_bytes();
    let em = &em[em.len().saturating_sub(k)..];
    // EM = 0x00 0x01 FF..FF 0x00 DigestInfo
    let Some(rest) = em.strip_prefix(&[0x00, 0x01]) else {
        return RsaDiagnosis::WrongKey;
    };
    let pad = rest.iter().take_while(|&&b| b == 0xff).count();
    let Some(info) = rest[pad..].strip_prefix(&[0x00]) else {
        return RsaDiagnosis::WrongKey;
    };
    if pad < 8 {
        return RsaDiagnosis::WrongKey;
    }
    for candidate in [RsaHash::Sha256, RsaHash::Sha1] {
        if let Some(d) = info.strip_prefix(candidate.digest_info_prefix()) {
            if candidate != hash {
                return RsaDiagnosis::OtherHash(candidate);
            }
            if d != candidate.digest(message).as_slice() {
                return RsaDiagnosis::ContentChanged;
            }
        }
    }
    RsaDiagnosis::WrongKey
}

/// Lower-case hex.
pub fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Upper-case hex.
pub fn hex_upper(bytes: &[u8]) -> String {
    hex_lower(bytes).to_ascii_uppercase()
}

/// MD5 digest.
pub fn md5(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

/// SHA-256 digest.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// HMAC-SHA256 tag.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, message);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Constant-time equality of two byte strings (the length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Strict standard base64 (padding required, no whitespace).
pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Why a decryption failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// The ciphertext is empty or not a whole number of blocks.
    #[error("ciphertext length {0} is not a positive multiple of 16")]
    BadLength(usize),
    /// PKCS#7 padding is not well formed.
    #[error("PKCS#7 padding is invalid")]
    BadPadding,
    /// The nonce is not 12 bytes.
    #[error("nonce must be 12 bytes, got {0}")]
    BadNonce(usize),
    /// The key is not 32 bytes.
    #[error("key must be 32 bytes, got {0}")]
    BadKey(usize),
    /// The GCM tag did not authenticate.
    #[error("authentication tag mismatch (wrong key or altered ciphertext)")]
    TagMismatch,
}

/// AES-256-ECB decryption with strict PKCS#7 unpadding (every pad byte checked).
pub fn aes256_ecb_decrypt(key: &[u8], data: &[u8]) -> Result<Vec<u8>, DecryptError> {
    let key: [u8; 32] = key
        .try_into()
        .map_err(|_| DecryptError::BadKey(key.len()))?;
    if data.is_empty() || !data.len().is_multiple_of(16) {
        return Err(DecryptError::BadLength(data.len()));
    }
    let cipher = Aes256::new(&Array::from(key));
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks_exact(16) {
        let mut block =
            Array::<u8, _>::try_from(chunk).map_err(|_| DecryptError::BadLength(data.len()))?;
        cipher.decrypt_block(&mut block);
        out.extend_from_slice(&block);
    }
    let n = *out.last().ok_or(DecryptError::BadPadding)? as usize;
    if n == 0 || n > 16 || n > out.len() {
        return Err(DecryptError::BadPadding);
    }
    let pad = &out[out.len() - n..];
    // Padding is not secret here (the plaintext is public once decrypted), but a uniform
    // check costs nothing.
    let bad = pad.iter().fold(0u8, |acc, &b| acc | (b ^ n as u8));
    if bad != 0 {
        return Err(DecryptError::BadPadding);
    }
    out.truncate(out.len() - n);
    Ok(out)
}

/// AEAD_AES_256_GCM open: `data` is ciphertext followed by the 16-byte tag.
pub fn aes256_gcm_open(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    data: &[u8],
) -> Result<Vec<u8>, DecryptError> {
    if key.len() != 32 {
        return Err(DecryptError::BadKey(key.len()));
    }
    let nonce: [u8; 12] = nonce
        .try_into()
        .map_err(|_| DecryptError::BadNonce(nonce.len()))?;
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key)
        .map_err(|_| DecryptError::BadKey(key.len()))?;
    let key = aead::LessSafeKey::new(unbound);
    let mut buf = data.to_vec();
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| DecryptError::TagMismatch)?;
    let len = plain.len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecb_rejects_bad_padding_and_lengths() {
        let key = [7u8; 32];
        assert_eq!(
            aes256_ecb_decrypt(&key, &[]),
            Err(DecryptError::BadLength(0))
        );
        assert_eq!(
            aes256_ecb_decrypt(&key, &[0; 15]),
            Err(DecryptError::BadLength(15))
        );
        assert_eq!(
            aes256_ecb_decrypt(&key[..31], &[0; 16]),
            Err(DecryptError::BadKey(31))
        );
    }

    #[test]
    fn gcm_rejects_bad_nonce() {
        let key = [1u8; 32];
        assert_eq!(
            aes256_gcm_open(&key, b"short", b"", &[0; 32]),
            Err(DecryptError::BadNonce(5))
        );
        assert_eq!(
            aes256_gcm_open(&key, b"123456789012", b"", &[0; 32]),
            Err(DecryptError::TagMismatch)
        );
    }

    #[test]
    fn ct_eq_compares_lengths_and_bytes() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn hex_round() {
        assert_eq!(hex_lower(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(hex_upper(&[0xab]), "AB");
    }
}
