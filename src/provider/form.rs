//! `application/x-www-form-urlencoded` decoding with Go's `net/url.ParseQuery` rules,
//! keeping values as bytes (GBK values must reach the verifier untouched).

use super::{Outcome, RejectReason, Rejection};

/// A decoded form: pairs in body order, keys unique.
pub(crate) type Form = Vec<(Vec<u8>, Vec<u8>)>;

/// The most parameters a notification may carry; real ones have a few dozen.
const MAX_PARAMS: usize = 512;

/// Decodes `body` once. A `;`, a bad `%` escape or a repeated key is refused.
pub(crate) fn parse(body: &[u8]) -> Outcome<Form> {
    let mut out: Form = Vec::new();
    for piece in body.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        if piece.contains(&b';') {
            return Err(Rejection::new(RejectReason::Malformed, "form contains ';'"));
        }
        let (k, v) = match piece.iter().position(|&b| b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        let key = unescape(k)?;
        let value = unescape(v)?;
        if out.iter().any(|(existing, _)| *existing == key) {
            return Err(Rejection::new(
                RejectReason::DuplicateField,
                format!(
                    "parameter {:?} appears more than once",
                    String::from_utf8_lossy(&key)
                ),
            ));
        }
        if out.len() == MAX_PARAMS {
            return Err(Rejection::new(
                RejectReason::Malformed,
                "too many parameters",
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn unescape(s: &[u8]) -> Outcome<Vec<u8>> {
    // Most values need no unescaping at all.
    if !s.iter().any(|&b| b == b'%' || b == b'+') {
        return Ok(s.to_vec());
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
                match (hex(s.get(i + 1)), hex(s.get(i + 2))) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => {
                        return Err(Rejection::new(
                            RejectReason::Malformed,
                            "bad %-escape in form",
                        ));
                    }
                }
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_parse_query() {
        let f = parse(b"a=1+2&b=%2B%3D&&c&d=x=y").unwrap();
        assert_eq!(
            f,
            vec![
                (b"a".to_vec(), b"1 2".to_vec()),
                (b"b".to_vec(), b"+=".to_vec()),
                (b"c".to_vec(), b"".to_vec()),
                (b"d".to_vec(), b"x=y".to_vec()),
            ]
        );
    }

    #[test]
    fn refuses_semicolons_bad_escapes_and_repeats() {
        assert_eq!(
            parse(b"a=1;b=2").unwrap_err().reason,
            RejectReason::Malformed
        );
        assert_eq!(parse(b"a=%zz").unwrap_err().reason, RejectReason::Malformed);
        assert_eq!(parse(b"a=%4").unwrap_err().reason, RejectReason::Malformed);
        assert_eq!(
            parse(b"a=1&a=2").unwrap_err().reason,
            RejectReason::DuplicateField
        );
        assert_eq!(
            parse(b"a=1&%61=2").unwrap_err().reason,
            RejectReason::DuplicateField
        );
    }
}
