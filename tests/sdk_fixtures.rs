//! Every committed third-party fixture (tests/fixtures/cases) through the adapters: the
//! accept cases verify with the expected normalized fields, the reject cases fail with the
//! expected reason.

mod support;

#[test]
fn every_fixture_case_gets_its_verdict() {
    let mut failures = Vec::new();
    for case in support::cases() {
        let expect = &case.expect;
        match (case.run(), case.accepts()) {
            (Ok(event), true) => {
                let checks = [
                    ("eventType", &event["type"]),
                    ("orderId", &event["orderId"]),
                    ("transactionId", &event["transactionId"]),
                    ("amount", &event["amount"]["value"]),
                    ("currency", &event["amount"]["currency"]),
                ];
                for (field, got) in checks {
                    if !expect[field].is_null() && &expect[field] != got {
                        failures.push(format!(
                            "{}: {field} is {got}, expected {}",
                            case.name, expect[field]
                        ));
                    }
                }
            }
            (Err(r), false) if Some(r.reason.as_str()) == case.reason() => {}
            (Err(r), false) => failures.push(format!(
                "{}: rejected as {} ({}), expected {:?}",
                case.name,
                r.reason.as_str(),
                r.detail,
                case.reason()
            )),
            (Ok(_), false) => failures.push(format!(
                "{}: accepted, expected rejection {:?}",
                case.name,
                case.reason()
            )),
            (Err(r), true) => failures.push(format!(
                "{}: rejected as {} ({})",
                case.name,
                r.reason.as_str(),
                r.detail
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fixtures_cover_every_sdk_and_reject_class() {
    let cases = support::cases();
    for sdk in [
        "python-alipay-sdk",
        "alipay-sdk-python",
        "wechatpy",
        "wechatpayv3",
        "alipay-sdk ",
        "wechatpay-axios-plugin",
    ] {
        assert!(
            cases.iter().any(|c| c.signed_by.contains(sdk)),
            "no fixture signed by {sdk}"
        );
    }
    for reason in [
        "empty_body",
        "invalid_utf8",
        "duplicate_field",
        "xml_dtd",
        "missing_signature",
        "bad_signature",
        "sign_type_mismatch",
        "merchant_mismatch",
        "unknown_serial",
        "stale_timestamp",
        "decrypt_failed",
    ] {
        assert!(
            cases.iter().any(|c| c.reason() == Some(reason)),
            "no fixture rejected as {reason}"
        );
    }
    for provider in ["alipay", "wechatpay-v2", "wechatpay-v3"] {
        assert!(cases.iter().any(|c| c.provider == provider && c.accepts()));
        assert!(cases.iter().any(|c| c.provider == provider && !c.accepts()));
    }
}
