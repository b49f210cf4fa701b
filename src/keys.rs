//! Key material parsing: RSA public keys in every form the platforms hand out, X.509
//! certificate facts, and Alipay's certificate serial numbers (protocols.md §2.5).

use crate::crypto::{self, RsaHash, RsaVerifier};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode, Tag, Tagged};

/// Why key material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Neither PEM nor base64 DER.
    #[error("not PEM and not base64: expected the platform's public key or certificate")]
    NotPemOrBase64,
    /// A PEM block whose type paynotify does not take.
    #[error("unsupported PEM block \"{0}\": expected PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE")]
    UnsupportedPem(String),
    /// A private key where the platform's public key belongs.
    #[error("this is a private key; give the platform's public key (never a private key)")]
    PrivateKey,
    /// PEM framing is broken.
    #[error("malformed PEM: {0}")]
    BadPem(String),
    /// DER that is neither SPKI, PKCS#1 nor a certificate.
    #[error("not an RSA public key, PKCS#1 key or X.509 certificate: {0}")]
    NotRsa(String),
    /// The modulus is too small for the algorithm.
    #[error("RSA key too short: {bits} bits, at least {min} required")]
    TooShort {
        /// Modulus size.
        bits: usize,
        /// Minimum accepted.
        min: usize,
    },
    /// A certificate that does not parse.
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    /// A symmetric key of the wrong length or alphabet.
    #[error("{0}")]
    BadSecret(String),
}

/// Facts about an X.509 certificate that operators need to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number, upper-case hex without leading zero bytes (WeChat's `serial_no` form).
    pub serial_hex: String,
    /// Serial number in base 10.
    pub serial_decimal: String,
    /// The issuer as Go's `pkix.Name.String()` prints it.
    pub issuer: String,
    /// The subject as Go's `pkix.Name.String()` prints it.
    pub subject: String,
    /// Alipay certificate SN: lower-case hex MD5(issuer ‖ decimal serial).
    pub alipay_sn: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

/// An RSA public key, normalized to SubjectPublicKeyInfo DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    spki_der: Vec<u8>,
    bits: usize,
    /// Present when the key came from a certificate.
    pub certificate: Option<CertificateInfo>,
    /// How the key was given (for diagnostics).
    pub format: KeyFormat,
}

/// The encoding a public key arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// One-line base64 SubjectPublicKeyInfo, as the Alipay console shows it.
    Base64Spki,
    /// `-----BEGIN PUBLIC KEY-----`.
    PemSpki,
    /// `-----BEGIN RSA PUBLIC KEY-----`.
    PemPkcs1,
    /// `-----BEGIN CERTIFICATE-----` (the first certificate of the file).
    Certificate,
    /// Base64 DER of a certificate or PKCS#1 key.
    Base64Der,
}

impl RsaPublicKey {
    /// Parses any supported encoding: base64 SPKI, PEM SPKI, PEM PKCS#1 or a PEM certificate.
    pub fn parse(input: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(input)
            .map_err(|_| KeyError::NotPemOrBase64)?
            .trim();
        if text.contains("-----BEGIN") {
            let block = first_pem_block(text)?;
            return match block.label.as_str() {
                "PUBLIC KEY" => Self::from_spki(&block.der, KeyFormat::PemSpki),
                "RSA PUBLIC KEY" => Self::from_pkcs1(&block.der, KeyFormat::PemPkcs1),
                "CERTIFICATE" => Self::from_certificate(&block.der, KeyFormat::Certificate),
                l if l.contains("PRIVATE KEY") => Err(KeyError::PrivateKey),
                other => Err(KeyError::UnsupportedPem(other.to_string())),
            };
        }
        let compact: String = text.split_whitespace().collect();
        let der = crypto::base64_decode(compact.as_bytes()).ok_or(KeyError::NotPemOrBase64)?;
        if let Ok(key) = Self::from_spki(&der, KeyFormat::Base64Spki) {
            return Ok(key);
        }
        if Certificate::from_der(&der).is_ok() {
            return Self::from_certificate(&der, KeyFormat::Base64Der);
        }
        if rsa::pkcs8::PrivateKeyInfoRef::try_from(der.as_slice()).is_ok()
            || <rsa::PrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_der(&der).is_ok()
        {
            return Err(KeyError::PrivateKey);
        }
        Self::from_pkcs1(&der, KeyFormat::Base64Der)
    }

    fn from_spki(der: &[u8], format: KeyFormat) -> Result<Self, KeyError> {
        let key = rsa::PublicKey::from_public_key_der(der)
            .map_err(|e| KeyError::NotRsa(e.to_string()))?;
        Self::from_rsa(&key, format, None)
    }

    fn from_pkcs1(der: &[u8], format: KeyFormat) -> Result<Self, KeyError> {
        let key =
            rsa::PublicKey::from_pkcs1_der(der).map_err(|e| KeyError::NotRsa(e.to_string()))?;
        Self::from_rsa(&key, format, None)
    }

    fn from_certificate(der: &[u8], format: KeyFormat) -> Result<Self, KeyError> {
        let cert =
            Certificate::from_der(der).map_err(|e| KeyError::BadCertificate(e.to_string()))?;
        let info = certificate_info(&cert)?;
        let spki = cert
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| KeyError::BadCertificate(e.to_string()))?;
        let key = rsa::PublicKey::from_public_key_der(&spki)
            .map_err(|_| KeyError::NotRsa("the certificate's key is not RSA".into()))?;
        Self::from_rsa(&key, format, Some(info))
    }

    fn from_rsa(
        key: &rsa::PublicKey,
        format: KeyFormat,
        certificate: Option<CertificateInfo>,
    ) -> Result<Self, KeyError> {
        let spki_der = key
            .to_public_key_der()
            .map_err(|e| KeyError::NotRsa(e.to_string()))?
            .as_bytes()
            .to_vec();
        Ok(RsaPublicKey {
            spki_der,
            bits: key.n().bit_width() as usize,
            certificate,
            format,
        })
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// `SHA256:<hex>` of the SubjectPublicKeyInfo DER: the same value for every encoding
    /// of the same key.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            crypto::hex_lower(&crypto::sha256(&self.spki_der))
        )
    }

    /// A verifier for `hash`, refusing keys shorter than `min_bits`.
    pub fn verifier(&self, hash: RsaHash, min_bits: usize) -> Result<RsaVerifier, KeyError> {
        if self.bits < min_bits {
            return Err(KeyError::TooShort {
                bits: self.bits,
                min: min_bits,
            });
        }
        RsaVerifier::new(&self.spki_der, hash).map_err(KeyError::NotRsa)
    }
}

/// One decoded PEM block.
#[derive(Debug)]
pub struct PemBlock {
    /// The type after `BEGIN`.
    pub label: String,
    /// The decoded body.
    pub der: Vec<u8>,
}

/// Every PEM block in `text`, in order. Like Go's `encoding/pem`, text around blocks is
/// ignored; unlike it, encrypted-key headers are refused.
pub fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, KeyError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after
            .find("-----")
            .ok_or_else(|| KeyError::BadPem("BEGIN line not closed".into()))?;
        let label = after[..label_end].to_string();
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let end = body_start
            .find(&end_marker)
            .ok_or_else(|| KeyError::BadPem(format!("no END line for {label}")))?;
        let body = &body_start[..end];
        if body.contains(':') {
            return Err(KeyError::BadPem(format!(
                "{label} has headers (encrypted keys are not supported)"
            )));
        }
        let compact: String = body.split_whitespace().collect();
        let der = crypto::base64_decode(compact.as_bytes())
            .ok_or_else(|| KeyError::BadPem(format!("{label} body is not base64")))?;
        out.push(PemBlock { label, der });
        rest = &body_start[end + end_marker.len()..];
    }
    Ok(out)
}

fn first_pem_block(text: &str) -> Result<PemBlock, KeyError> {
    pem_blocks(text)?
        .into_iter()
        .next()
        .ok_or_else(|| KeyError::BadPem("no PEM block".into()))
}

/// Parses the first certificate of a PEM file.
pub fn parse_certificate_pem(input: &[u8]) -> Result<CertificateInfo, KeyError> {
    let text = std::str::from_utf8(input).map_err(|_| KeyError::BadPem("not UTF-8".into()))?;
    let block = first_pem_block(text)?;
    if block.label != "CERTIFICATE" {
        return Err(KeyError::UnsupportedPem(block.label));
    }
    let cert =
        Certificate::from_der(&block.der).map_err(|e| KeyError::BadCertificate(e.to_string()))?;
    certificate_info(&cert)
}

/// Alipay's `alipay_root_cert_sn`: the SN of every RSA-signed certificate in the bundle,
/// joined with `_` in file order; certificates that do not parse (SM2) or are not
/// RSA-signed (ECDSA) are skipped, as GoPay and the Java SDK do.
pub fn alipay_root_cert_sn(bundle: &[u8]) -> Result<String, KeyError> {
    let text = std::str::from_utf8(bundle).map_err(|_| KeyError::BadPem("not UTF-8".into()))?;
    let mut sns = Vec::new();
    for block in pem_blocks(text)?
        .into_iter()
        .filter(|b| b.label == "CERTIFICATE")
    {
        let Ok(cert) = Certificate::from_der(&block.der) else {
            continue;
        };
        if !is_rsa_signature(&cert.signature_algorithm().oid.to_string()) {
            continue;
        }
        if let Ok(info) = certificate_info(&cert) {
            sns.push(info.alipay_sn);
        }
    }
    if sns.is_empty() {
        return Err(KeyError::BadCertificate(
            "no RSA-signed certificate in the root bundle".into(),
        ));
    }
    Ok(sns.join("_"))
}

/// Go's allow-list (MD2/MD5/SHA1/SHA256/SHA384/SHA512 with RSA, and RSA-PSS).
fn is_rsa_signature(oid: &str) -> bool {
    matches!(
        oid,
        "1.2.840.113549.1.1.2"
            | "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.113549.1.1.11"
            | "1.2.840.113549.1.1.12"
            | "1.2.840.113549.1.1.13"
            | "1.2.840.113549.1.1.10"
    )
}

fn certificate_info(cert: &Certificate) -> Result<CertificateInfo, KeyError> {
    let tbs = cert.tbs_certificate();
    let serial = tbs.serial_number().as_bytes();
    let serial_decimal = signed_be_to_decimal(serial);
    let issuer = go_name_string(tbs.issuer().as_ref())?;
    let subject = go_name_string(tbs.subject().as_ref())?;
    let alipay_sn = crypto::hex_lower(&crypto::md5(format!("{issuer}{serial_decimal}").as_bytes()));
    let trimmed: &[u8] = {
        let z = serial.iter().take_while(|&&b| b == 0).count();
        if z == serial.len() {
            &serial[serial.len().saturating_sub(1)..]
        } else {
            &serial[z..]
        }
    };
    let validity = tbs.validity();
    Ok(CertificateInfo {
        serial_hex: crypto::hex_upper(trimmed),
        serial_decimal,
        issuer,
        subject,
        alipay_sn,
        not_before: validity.not_before.to_unix_duration().as_secs() as i64,
        not_after: validity.not_after.to_unix_duration().as_secs() as i64,
    })
}

/// Decimal text of a two's-complement big-endian integer, as Go's `big.Int.String()`.
fn signed_be_to_decimal(bytes: &[u8]) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut mag: Vec<u8> = bytes.to_vec();
    if negative {
        // magnitude = two's complement of the value
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
    }
    let mut digits = Vec::new();
    let mut num: Vec<u8> = mag.into_iter().skip_while(|&b| b == 0).collect();
    while !num.is_empty() {
        let mut rem = 0u32;
        let mut next = Vec::with_capacity(num.len());
        for &b in &num {
            let cur = (rem << 8) | b as u32;
            let q = cur / 10;
            rem = cur % 10;
            if !(next.is_empty() && q == 0) {
                next.push(q as u8);
            }
        }
        digits.push(b'0' + rem as u8);
        num = next;
    }
    if digits.is_empty() {
        return "0".into();
    }
    if negative {
        digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// Named attributes of Go's `pkix.Name` (OID arc 2.5.4.x), in `ToRDNSequence` order.
const GO_NAMED_ORDER: [(u32, &str); 9] = [
    (6, "C"),
    (8, "ST"),
    (7, "L"),
    (9, "STREET"),
    (17, "POSTALCODE"),
    (10, "O"),
    (11, "OU"),
    (3, "CN"),
    (5, "SERIALNUMBER"),
];

fn named_arc(oid: &str) -> Option<u32> {
    let arc: u32 = oid.strip_prefix("2.5.4.")?.parse().ok()?;
    GO_NAMED_ORDER.iter().any(|(a, _)| *a == arc).then_some(arc)
}

/// One attribute as Go sees it: the OID and its value as a Go string (if it is a string type).
struct GoAttr {
    oid: String,
    value: Result<String, Vec<u8>>,
}

/// Reproduces Go's `pkix.Name.String()` for a parsed RDN sequence (protocols.md §2.5).
pub fn go_name_string(rdns: &x509_cert::name::RdnSequence) -> Result<String, KeyError> {
    let mut names: Vec<GoAttr> = Vec::new();
    for rdn in rdns.iter() {
        for atv in rdn.iter() {
            let value = match decode_directory_string(&atv.value) {
                Some(s) => Ok(s),
                None => Err(atv
                    .value
                    .to_der()
                    .map_err(|e| KeyError::BadCertificate(e.to_string()))?),
            };
            names.push(GoAttr {
                oid: atv.oid.to_string(),
                value,
            });
        }
    }
    // FillFromRDNSequence: named string attributes go to fields (CN and SERIALNUMBER keep the
    // last value, the others accumulate).
    let mut fields: Vec<(u32, Vec<String>)> = GO_NAMED_ORDER
        .iter()
        .map(|(a, _)| (*a, Vec::new()))
        .collect();
    for attr in &names {
        if let (Some(arc), Ok(v)) = (named_arc(&attr.oid), &attr.value) {
            let slot = &mut fields.iter_mut().find(|(a, _)| *a == arc).map(|(_, v)| v);
            if let Some(values) = slot {
                if arc == 3 || arc == 5 {
                    values.clear();
                }
                values.push(v.clone());
            }
        }
    }
    // String(): non-named attributes first (they print last), then ToRDNSequence.
    let mut seq: Vec<Vec<(String, String)>> = Vec::new();
    for attr in &names {
        if named_arc(&attr.oid).is_some() {
            continue;
        }
        seq.push(vec![(attr.oid.clone(), unknown_attr_value(&attr.value))]);
    }
    for (arc, label) in GO_NAMED_ORDER {
        let values = &fields
            .iter()
            .find(|(a, _)| *a == arc)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        if values.is_empty() {
            continue;
        }
        seq.push(
            values
                .iter()
                .map(|v| (label.to_string(), escape_go_value(v)))
                .collect(),
        );
    }
    let parts: Vec<String> = seq
        .iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|(t, v)| format!("{t}={v}"))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Ok(parts.join(","))
}

/// Go prints an unknown attribute as `#` + hex of `asn1.Marshal(value)`: a Go string is
/// re-encoded as PrintableString when its characters allow, else UTF8String.
fn unknown_attr_value(value: &Result<String, Vec<u8>>) -> String {
    match value {
        Ok(s) => {
            let printable = s
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&c));
            let tag: u8 = if printable { 0x13 } else { 0x0c };
            let mut der = vec![tag];
            let len = s.len();
            if len < 0x80 {
                der.push(len as u8);
            } else {
                let bytes: Vec<u8> = len
                    .to_be_bytes()
                    .into_iter()
                    .skip_while(|&b| b == 0)
                    .collect();
                der.push(0x80 | bytes.len() as u8);
                der.extend(bytes);
            }
            der.extend_from_slice(s.as_bytes());
            format!("#{}", crypto::hex_lower(&der))
        }
        Err(raw) => format!("#{}", crypto::hex_lower(raw)),
    }
}

fn escape_go_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.len().saturating_sub(1);
    for (k, c) in v.char_indices() {
        let escape = match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => true,
            ' ' => k == 0 || k == last,
            '#' => k == 0,
            _ => false,
        };
        if escape {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The string types Go's x509 parser turns into Go strings.
fn decode_directory_string(value: &x509_cert::der::Any) -> Option<String> {
    let bytes = value.value();
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::NumericString => {
            String::from_utf8(bytes.to_vec()).ok()
        }
        // Go keeps T61String bytes as they are.
        Tag::TeletexString => String::from_utf8(bytes.to_vec()).ok(),
        Tag::BmpString => {
            if !bytes.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// A symmetric key given as text (WeChat API keys): exactly `len` visible ASCII characters.
pub fn parse_ascii_secret(input: &[u8], len: usize, what: &str) -> Result<Vec<u8>, KeyError> {
    let text = std::str::from_utf8(input)
        .map_err(|_| KeyError::BadSecret(format!("{what} is not text")))?
        .trim();
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KeyError::BadSecret(format!(
            "{what} must be printable ASCII"
        )));
    }
    if text.len() != len {
        return Err(KeyError::BadSecret(format!(
            "{what} must be {len} characters, got {}",
            text.len()
        )));
    }
    Ok(text.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_serials() {
        assert_eq!(signed_be_to_decimal(&[0x00]), "0");
        assert_eq!(signed_be_to_decimal(&[0x01, 0x00]), "256");
        assert_eq!(signed_be_to_decimal(&[0x00, 0xff]), "255");
        assert_eq!(signed_be_to_decimal(&[0xff]), "-1");
        assert_eq!(signed_be_to_decimal(&[0x80]), "-128");
        assert_eq!(
            signed_be_to_decimal(&[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11]),
            "335812727670730321937"
        );
    }

    #[test]
    fn go_escaping() {
        assert_eq!(escape_go_value(" a,b "), "\\ a\\,b\\ ");
        assert_eq!(escape_go_value("#x#"), "\\#x#");
    }

    #[test]
    fn refuses_private_and_garbage() {
        assert_eq!(
            RsaPublicKey::parse(b"hello world"),
            Err(KeyError::NotPemOrBase64)
        );
        let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            RsaPublicKey::parse(pem.as_bytes()),
            Err(KeyError::PrivateKey)
        );
        let pem = "-----BEGIN EC PUBLIC KEY-----\nAAAA\n-----END EC PUBLIC KEY-----\n";
        assert!(matches!(
            RsaPublicKey::parse(pem.as_bytes()),
            Err(KeyError::UnsupportedPem(_))
        ));
    }

    const RSA_1024: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC0m7N/zIEwh8G47JlzWT+cI5Jl
/9orClRm+D64iD/dCb3Yx12NWYMPQ/672ApfBIEkoVoDeQASd7cijUt3GZM3Xi8I
FbqOFL5ddECofdLKLjRln576GRDFQTt8OePraqTknXMl7ao+0HD4ZdY3lX2dGFaw
oWWAC56tt796Nu/sRQIDAQAB
-----END PUBLIC KEY-----
";

    #[test]
    fn short_keys_are_refused_by_size() {
        let key = RsaPublicKey::parse(RSA_1024.as_bytes()).unwrap();
        assert_eq!(key.bits(), 1024);
        assert_eq!(
            key.verifier(RsaHash::Sha256, 2048).unwrap_err(),
            KeyError::TooShort {
                bits: 1024,
                min: 2048
            }
        );
        assert!(key.verifier(RsaHash::Sha1, 1024).is_ok());
        assert!(
            KeyError::TooShort {
                bits: 1024,
                min: 2048
            }
            .to_string()
            .contains("too short")
        );
    }

    #[test]
    fn the_same_key_has_one_fingerprint_in_every_encoding() {
        let pem = RsaPublicKey::parse(RSA_1024.as_bytes()).unwrap();
        let der = pem.spki_der().to_vec();
        let one_line = crypto::base64_encode(&der);
        let from_line = RsaPublicKey::parse(one_line.as_bytes()).unwrap();
        assert_eq!(from_line.format, KeyFormat::Base64Spki);
        assert_eq!(from_line.fingerprint(), pem.fingerprint());
    }
}
