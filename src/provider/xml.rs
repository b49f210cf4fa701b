//! A deliberately small XML reader for WeChat Pay v2: one root element holding flat child
//! elements. DTDs, entity declarations, processing instructions, nested elements, repeated
//! elements and invalid UTF-8 are refused; text follows Go's `encoding/xml` (CDATA and text
//! joined, `\r\n` and stray `\r` become `\n`, the five predefined entities and character
//! references decoded, nothing trimmed).

use super::{Outcome, RejectReason, Rejection, TextFields};
use quick_xml::Reader;
use quick_xml::events::Event;

/// The most child elements a notification may carry.
const MAX_FIELDS: usize = 256;

/// Parses `body` as `<root><name>value</name>…</root>`.
pub(crate) fn parse(body: &[u8]) -> Outcome<TextFields> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Rejection::new(RejectReason::InvalidUtf8, "XML body is not UTF-8"))?;
    let malformed = |what: String| Rejection::new(RejectReason::Malformed, what);
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = true;
    config.allow_dangling_amp = false;
    config.expand_empty_elements = true;

    let mut fields: Vec<(String, String)> = Vec::new();
    let mut depth = 0usize;
    let mut seen_root = false;
    let mut current: Option<(String, String)> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| malformed(format!("XML: {e}")))?;
        match event {
            Event::DocType(_) => {
                return Err(Rejection::new(
                    RejectReason::XmlDtd,
                    "XML carries a DOCTYPE/DTD",
                ));
            }
            Event::PI(_) => {
                return Err(Rejection::new(
                    RejectReason::XmlDtd,
                    "XML carries a processing instruction",
                ));
            }
            Event::Decl(decl) => {
                if let Some(Ok(enc)) = decl.encoding() {
                    let enc = enc.to_ascii_lowercase();
                    if enc != "utf-8" && enc != "utf8" {
                        return Err(malformed(format!(
                            "XML declares encoding {enc:?}; only UTF-8 is accepted"
                        )));
                    }
                }
            }
            Event::Comment(_) => {}
            Event::Start(start) => {
                let name = start.local_name().as_ref().to_string();
                depth += 1;
                match depth {
                    1 if seen_root => return Err(malformed("more than one root element".into())),
                    1 => seen_root = true,
                    2 => {
                        if fields.iter().any(|(n, _)| *n == name) {
                            return Err(Rejection::new(
                                RejectReason::DuplicateField,
                                format!("element <{name}> appears more than once"),
                            ));
                        }
                        if fields.len() == MAX_FIELDS {
                            return Err(malformed("too many elements".into()));
                        }
                        current = Some((name, String::new()));
                    }
                    _ => {
                        return Err(malformed(format!(
                            "nested element <{name}> is not expected"
                        )));
                    }
                }
            }
            Event::End(_) => {
                if depth == 2
                    && let Some(field) = current.take()
                {
                    fields.push(field);
                }
                depth = depth.saturating_sub(1);
            }
            Event::Empty(_) => unreachable_empty()?,
            Event::Text(t) => {
                let content = t.xml10_content();
                match (&mut current, depth) {
                    (Some((_, value)), 2) => value.push_str(&content),
                    _ if content.trim().is_empty() => {}
                    _ => return Err(malformed("text outside the field elements".into())),
                }
            }
            Event::CData(c) => match (&mut current, depth) {
                (Some((_, value)), 2) => value.push_str(&c.xml10_content()),
                _ => return Err(malformed("CDATA outside the field elements".into())),
            },
            Event::GeneralRef(r) => {
                let ch = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .ok()
                        .flatten()
                        .filter(|c| is_xml_char(*c))
                        .ok_or_else(|| malformed("invalid character reference".into()))?
                } else {
                    match &*r {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        other => {
                            return Err(Rejection::new(
                                RejectReason::XmlDtd,
                                format!("undeclared entity &{other}; (entities are not accepted)"),
                            ));
                        }
                    }
                };
                match (&mut current, depth) {
                    (Some((_, value)), 2) => value.push(ch),
                    _ => return Err(malformed("reference outside the field elements".into())),
                }
            }
            Event::Eof => break,
        }
    }
    if !seen_root || depth != 0 {
        return Err(malformed("XML document is incomplete".into()));
    }
    Ok(TextFields(fields))
}

/// `expand_empty_elements` turns `<a/>` into Start+End, so Empty never arrives.
fn unreachable_empty() -> Outcome<()> {
    Err(Rejection::new(
        RejectReason::Malformed,
        "unexpected empty element",
    ))
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(body: &str) -> RejectReason {
        parse(body.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn reads_flat_documents_like_go() {
        let f = parse(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><xml><a><![CDATA[x]]>y</a><b>1&amp;2&#x41;</b><c></c><d/>\r\n<e>l1\r\nl2</e></xml>").unwrap();
        assert_eq!(
            f.0,
            vec![
                ("a".into(), "xy".into()),
                ("b".into(), "1&2A".into()),
                ("c".into(), "".into()),
                ("d".into(), "".into()),
                ("e".into(), "l1\nl2".into()),
            ]
        );
    }

    #[test]
    fn refuses_what_is_dangerous_or_ambiguous() {
        assert_eq!(
            reason("<!DOCTYPE x [<!ENTITY a \"b\">]><xml><a>&a;</a></xml>"),
            RejectReason::XmlDtd
        );
        assert_eq!(reason("<xml><a>&xxe;</a></xml>"), RejectReason::XmlDtd);
        assert_eq!(reason("<?php x?><xml></xml>"), RejectReason::XmlDtd);
        assert_eq!(
            reason("<xml><a>1</a><a>2</a></xml>"),
            RejectReason::DuplicateField
        );
        assert_eq!(
            reason("<xml><a><b>1</b></a></xml>"),
            RejectReason::Malformed
        );
        assert_eq!(reason("<xml><a>1</a>"), RejectReason::Malformed);
        assert_eq!(reason("<xml><a>1</b></xml>"), RejectReason::Malformed);
        assert_eq!(reason("<xml></xml><xml></xml>"), RejectReason::Malformed);
        assert_eq!(reason("<xml>text<a>1</a></xml>"), RejectReason::Malformed);
        assert_eq!(reason("<xml><a>&#0;</a></xml>"), RejectReason::Malformed);
        assert_eq!(
            reason("<?xml version=\"1.0\" encoding=\"GBK\"?><xml></xml>"),
            RejectReason::Malformed
        );
        assert_eq!(
            parse(b"<xml><a>\xff</a></xml>").unwrap_err().reason,
            RejectReason::InvalidUtf8
        );
    }
}
