//! Route status from an evaluation: metav1 conditions whose `lastTransitionTime` changes only
//! when their status flips (cert-manager's rule), and the facts a user needs.

use super::evaluate::Evaluation;
use crate::crd::PaymentNotifyRouteStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The status for `eval`, keeping transition times from `previous` where nothing flipped.
pub fn build(
    previous: Option<&PaymentNotifyRouteStatus>,
    eval: &Evaluation,
    generation: Option<i64>,
    path: &str,
    public_base_url: Option<&str>,
    now: &Time,
) -> PaymentNotifyRouteStatus {
    let conditions = eval
        .conditions
        .iter()
        .map(|fact| {
            let status = if fact.ok { "True" } else { "False" };
            let old = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == fact.type_));
            let last_transition_time = match old {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: fact.type_.to_string(),
                status: status.to_string(),
                reason: fact.reason.to_string(),
                message: fact.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect();
    PaymentNotifyRouteStatus {
        observed_generation: generation,
        conditions,
        provider: eval.provider.map(str::to_string),
        callback_url: public_base_url.map(|base| format!("{}{path}", base.trim_end_matches('/'))),
        keys: eval.keys.clone(),
    }
}

/// Conditions of `new` whose status differs from `previous` (or that are new): the
/// transitions worth an Event.
pub fn transitions<'a>(
    previous: Option<&PaymentNotifyRouteStatus>,
    new: &'a PaymentNotifyRouteStatus,
) -> Vec<&'a Condition> {
    new.conditions
        .iter()
        .filter(|c| {
            previous
                .and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
                .is_none_or(|o| o.status != c.status)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::evaluate::{ConditionFact, Evaluation};

    fn eval(ready: bool) -> Evaluation {
        Evaluation {
            key: "ns/r".into(),
            resolved: None,
            conditions: vec![
                ConditionFact {
                    type_: "Ready",
                    ok: ready,
                    reason: if ready { "Ready" } else { "SecretNotFound" },
                    message: "m".into(),
                },
                ConditionFact {
                    type_: "PathAccepted",
                    ok: true,
                    reason: "PathAccepted",
                    message: "serving /p".into(),
                },
            ],
            provider: Some("alipay"),
            keys: Vec::new(),
        }
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first = build(
            None,
            &eval(false),
            Some(1),
            "/p",
            Some("https://pay.example.com/"),
            &at(100),
        );
        assert_eq!(
            first.callback_url.as_deref(),
            Some("https://pay.example.com/p")
        );
        assert_eq!(transitions(None, &first).len(), 2);
        let same = build(Some(&first), &eval(false), Some(2), "/p", None, &at(200));
        assert_eq!(same.conditions[0].last_transition_time, at(100));
        assert_eq!(same.conditions[0].observed_generation, Some(2));
        assert!(transitions(Some(&first), &same).is_empty());
        let flipped = build(Some(&same), &eval(true), Some(2), "/p", None, &at(300));
        assert_eq!(flipped.conditions[0].last_transition_time, at(300));
        assert_eq!(flipped.conditions[1].last_transition_time, at(100));
        let moved: Vec<&str> = transitions(Some(&same), &flipped)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(moved, ["Ready"]);
    }
}
