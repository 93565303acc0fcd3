use super::*;

fn item(pairs: &[(&str, AttributeValue)]) -> Item {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

#[test]
fn parses_a_full_item() {
    let r = parse_item(&item(&[
        (TENANT_ID, s("t-1")),
        (WHATSAPP_CONNECTED, AttributeValue::Bool(true)),
        (STATUS, s("connected")),
        (STATUS_CHANGED_AT, n(5)),
        (CONSECUTIVE_FAILURES, n(2)),
        (LEASE_OWNER, s("host-a")),
        (LEASE_EPOCH, n(3)),
        (LEASE_EXPIRES_AT, n(99)),
    ]))
    .unwrap();
    assert_eq!(r.status, Some(TenantStatus::Connected));
    assert_eq!(r.consecutive_failures, 2);
    assert_eq!(r.lease, Some(Lease { owner: "host-a".into(), epoch: 3, version: 0, expires_at: 99 }), "no version: 0");
    assert_eq!(r.reason, None);
}

#[test]
fn refuses_bad_items_without_echoing_them() {
    let err = parse_item(&item(&[(TENANT_ID, s("../evil"))])).unwrap_err().to_string();
    assert!(!err.contains("evil"), "{err}");
    assert!(parse_item(&item(&[(TENANT_ID, s("t")), (STATUS, s("nope"))])).is_err());
    assert!(parse_item(&item(&[(TENANT_ID, s("t")), (CONSECUTIVE_FAILURES, n(-1))])).is_err());
    assert!(parse_item(&item(&[(TENANT_ID, s("t")), (WHATSAPP_CONNECTED, s("yes"))])).is_err());
}

#[test]
fn page_tokens_round_trip_and_refuse_forgeries() {
    let key = item(&[(TENANT_ID, s("../odd")), (DESIRED_SHARD, n(3))]);
    let token = encode_page_token(&key).unwrap();
    assert_eq!(decode_page_token(&token).unwrap(), key);
    let long = "x".repeat(MAX_TOKEN_LEN + 1);
    for bad in ["", "..", "a/b", "%2e%2e", "a\0b", "\u{0430}bc", "abcd", long.as_str()] {
        assert!(matches!(decode_page_token(bad), Err(StoreError::Invalid(_))), "{bad:?}");
    }
    let no_shard = URL_SAFE_NO_PAD.encode(br#"{"t":"a","s":"x"}"#);
    assert!(decode_page_token(&no_shard).is_err());
}

#[test]
fn expiry_saturates() {
    assert_eq!(expiry(10, 5), 15);
    assert_eq!(expiry(i64::MAX - 1, u64::MAX), i64::MAX);
}
