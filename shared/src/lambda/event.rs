//! What started a function run: a Scheduler event or a direct invoke, told apart strictly (a typo must not
//! turn into "restore everything").

use serde_json::Value;

use crate::domain::TenantId;
use crate::restore::FanoutRequest;

/// Most tenant ids one direct invoke may name.
pub const MAX_REQUEST_IDS: usize = 10_000;

/// What started a function run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// An EventBridge Scheduler (or EventBridge rule) event.
    Scheduled {
        /// The schedule's ARN, when the event names it.
        schedule: Option<String>,
        /// The scheduled time, when the event carries it.
        time: Option<String>,
    },
    /// A direct invoke: `{}` or `{"tenant_ids": [...]}`.
    Direct(FanoutRequest),
}

/// An event no function accepts. The message names the field or position, never the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unrecognised event: {0}")]
pub struct EventError(pub String);

/// Tells a Scheduler event from a direct invoke. A Scheduler event has `source` `aws.scheduler` (or
/// `aws.events` from an EventBridge rule) and `detail-type` `Scheduled Event`; a direct invoke is `{}`, `null`
/// or an object whose only member is `tenant_ids`. Anything else is refused rather than guessed at: a typo
/// such as `tenant_id` must not turn into "restore everything".
pub fn classify_event(event: &Value) -> Result<Invocation, EventError> {
    let obj = match event {
        Value::Null => return Ok(Invocation::Direct(FanoutRequest::default())),
        Value::Object(o) => o,
        _ => return Err(EventError("expected a JSON object".into())),
    };
    let source = obj.get("source").and_then(Value::as_str);
    let detail_type = obj.get("detail-type").and_then(Value::as_str);
    if matches!(source, Some("aws.scheduler" | "aws.events")) || detail_type == Some("Scheduled Event") {
        let schedule = obj.get("resources").and_then(|r| r.get(0)).and_then(Value::as_str).map(str::to_owned);
        let time = obj.get("time").and_then(Value::as_str).map(str::to_owned);
        return Ok(Invocation::Scheduled { schedule, time });
    }
    if obj.keys().any(|k| k != "tenant_ids") {
        return Err(EventError(
            "expected a Scheduler event or {\"tenant_ids\": [...]}; the object has other fields".into(),
        ));
    }
    let tenant_ids = match obj.get("tenant_ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            if items.len() > MAX_REQUEST_IDS {
                return Err(EventError(format!("tenant_ids holds more than {MAX_REQUEST_IDS} ids")));
            }
            let mut ids = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let id = item
                    .as_str()
                    .and_then(|s| TenantId::parse(s).ok())
                    .ok_or_else(|| EventError(format!("tenant_ids[{i}] is not a valid tenant id")))?;
                ids.push(id);
            }
            Some(ids)
        }
        Some(_) => return Err(EventError("tenant_ids must be an array of strings".into())),
    };
    Ok(Invocation::Direct(FanoutRequest { tenant_ids }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scheduler_events_are_recognised() {
        let ev = json!({
            "version": "0", "id": "e1", "detail-type": "Scheduled Event", "source": "aws.scheduler",
            "account": "123456789012", "time": "2026-11-28T12:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:scheduler:us-east-1:123456789012:schedule/default/sweep"], "detail": "{}"
        });
        assert_eq!(
            classify_event(&ev).unwrap(),
            Invocation::Scheduled {
                schedule: Some("arn:aws:scheduler:us-east-1:123456789012:schedule/default/sweep".into()),
                time: Some("2026-11-28T12:00:00Z".into()),
            }
        );
        let rule = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
        assert!(matches!(classify_event(&rule).unwrap(), Invocation::Scheduled { .. }));
    }

    #[test]
    fn direct_invokes_are_recognised() {
        assert_eq!(classify_event(&json!({})).unwrap(), Invocation::Direct(FanoutRequest::default()));
        assert_eq!(classify_event(&Value::Null).unwrap(), Invocation::Direct(FanoutRequest::default()));
        assert_eq!(
            classify_event(&json!({"tenant_ids": ["a", "b-2"]})).unwrap(),
            Invocation::Direct(FanoutRequest {
                tenant_ids: Some(vec![TenantId::parse("a").unwrap(), TenantId::parse("b-2").unwrap()])
            })
        );
        assert_eq!(classify_event(&json!({"tenant_ids": null})).unwrap(), Invocation::Direct(FanoutRequest::default()));
    }

    #[test]
    fn anything_else_is_refused_without_echoing() {
        for bad in [
            json!({"tenant_id": ["a"]}),
            json!({"tenant_ids": "a"}),
            json!({"tenant_ids": [1]}),
            json!({"tenant_ids": ["../secret"]}),
            json!([1, 2]),
            json!("restore"),
        ] {
            let err = classify_event(&bad).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{err}");
        }
        let err = classify_event(&json!({"tenant_ids": ["ok", "../secret"]})).unwrap_err();
        assert!(err.0.contains("tenant_ids[1]"), "{err}");
        let many: Vec<String> = (0..=MAX_REQUEST_IDS).map(|i| format!("t{i}")).collect();
        assert!(classify_event(&json!({ "tenant_ids": many })).is_err());
    }
}
