use super::*;

#[test]
fn record_ids_are_valid_firestore_ids_and_distinct() {
    let a = record_doc_id(&RecordKey::new(RecordKind::Session, "a/b"));
    let b = record_doc_id(&RecordKey::new(RecordKind::Session, "a_b"));
    assert!(!a.contains('/'));
    assert_ne!(a, b);
    let long = record_doc_id(&RecordKey::new(RecordKind::AppStateMutationMac, "x".repeat(MAX_RECORD_KEY_LEN)));
    assert!(long.len() < 1500, "firestore ids are at most 1500 bytes");
    assert_eq!(record_doc_id(&RecordKey::new(RecordKind::Other, "")), "other~");
}

#[test]
fn set_ids_differ() {
    assert_ne!(new_set_id(), new_set_id());
    assert_eq!(new_set_id().len(), 16);
}

#[test]
fn fencing_refuses_only_older_epochs() {
    let m = Meta {
        generation: 3,
        write_epoch: 4,
        max_epoch: 5,
        set: None,
        garbage: vec![],
        sealed_by: vec![],
        update_time: Timestamp::default(),
    };
    assert!(Meta::fence(Some(&m), 5).is_ok());
    assert!(Meta::fence(Some(&m), 6).is_ok());
    assert!(matches!(
        Meta::fence(Some(&m), 4),
        Err(StoreError::Conflict(Conflict::StaleEpoch { presented: 4, current: 5 }))
    ));
    assert!(Meta::fence(None, 0).is_ok());
}

#[test]
fn transient_codes_are_unavailable() {
    for code in [Code::Unavailable, Code::DeadlineExceeded, Code::ResourceExhausted, Code::Internal] {
        assert!(map_status("x", Status::new(code, "m")).is_transient());
    }
    assert!(matches!(map_status("x", Status::invalid_argument("too big")), StoreError::Invalid(_)));
}
