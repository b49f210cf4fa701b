//! Every event the adapters emit validates against the committed `docs/event.schema.json`.

mod support;

use paynotify::event::EventType;
use serde_json::Value;

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/event.schema.json"
    ))
    .unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap()
}

#[test]
fn every_emitted_event_validates() {
    let validator = validator();
    let mut types = std::collections::BTreeSet::new();
    let mut checked = 0;
    for case in support::cases().into_iter().filter(|c| c.accepts()) {
        let event = case.run().unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}\n{event:#}", case.name);
        types.insert(event["type"].as_str().unwrap().to_string());
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} events checked");
    // The fixtures reach every type except the ones only a live order in waiting can produce.
    for t in [
        "payment.succeeded",
        "payment.closed",
        "payment.finished",
        "payment.failed",
        "refund.succeeded",
        "refund.closed",
        "refund.abnormal",
    ] {
        assert!(types.contains(t), "no fixture produced {t}");
    }
}

#[test]
fn schema_lists_every_event_type_and_rejects_strangers() {
    let validator = validator();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/event.schema.json"
    ))
    .unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    let listed: Vec<&str> = schema["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for t in [
        EventType::PaymentSucceeded,
        EventType::PaymentPending,
        EventType::PaymentClosed,
        EventType::PaymentFinished,
        EventType::PaymentFailed,
        EventType::RefundSucceeded,
        EventType::RefundClosed,
        EventType::RefundAbnormal,
    ] {
        assert!(
            listed.contains(&t.as_str()),
            "{} missing from the schema",
            t.as_str()
        );
    }
    let bad = serde_json::json!({"schemaVersion": "1", "id": "evt_x", "type": "payment.succeeded", "provider": "alipay",
        "route": "r", "receivedAt": "yesterday", "status": "S", "data": {}});
    assert!(
        validator.iter_errors(&bad).count() >= 3,
        "id, receivedAt and the required amount must all fail"
    );
}
