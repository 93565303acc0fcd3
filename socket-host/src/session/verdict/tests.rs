use super::*;

const RUNNING: Phase = Phase::Running { linking: false };
const LINKING: Phase = Phase::Running { linking: true };
const PHASES: [Phase; 3] = [RUNNING, LINKING, Phase::Ended];

fn judge(signal: Signal, phase: Phase) -> Verdict {
    verdict(signal, phase, Instant::now())
}

fn terminal(state: SessionState, reason: &str) -> Verdict {
    Verdict::Ends(Outcome::Terminal { state, reason: reason.into() })
}

fn retry(reason: &str, rate_limited: bool) -> Verdict {
    Verdict::Ends(Outcome::Retry { reason: reason.into(), rate_limited })
}

#[test]
fn logged_out_and_replaced_end_the_session_in_every_phase() {
    for phase in PHASES {
        assert_eq!(
            judge(Signal::LoggedOut("logged out (401)".into()), phase),
            terminal(SessionState::LoggedOut, "logged out (401)"),
            "{phase:?}"
        );
        assert_eq!(
            judge(Signal::Replaced, phase),
            terminal(SessionState::Replaced, "replaced: another client took over this number (440 conflict)"),
            "{phase:?}"
        );
    }
}

#[test]
fn disconnects_and_stream_errors_are_kept_in_every_phase() {
    for phase in PHASES {
        assert_eq!(judge(Signal::Disconnected("reset".into()), phase), Verdict::Lost("reset".into()), "{phase:?}");
        assert_eq!(judge(Signal::StreamError("515".into()), phase), Verdict::StreamError("515".into()), "{phase:?}");
    }
}

#[test]
fn after_the_run_nothing_else_counts() {
    let ignored = [
        Signal::Connected,
        Signal::TempBan { expire: Duration::from_secs(60), code: "x".into() },
        Signal::ConnectFailure { code: 401, logged_out: true },
        Signal::ConnectFailure { code: 402, logged_out: false },
        Signal::ConnectFailure { code: 429, logged_out: false },
        Signal::Qr { code: "2@q".into(), valid_for: Duration::from_secs(20) },
        Signal::Paired { jid: "1@s.whatsapp.net".into() },
        Signal::PairFailed("bad".into()),
        Signal::QrExhausted { disconnected: true },
    ];
    for signal in ignored {
        assert_eq!(judge(signal.clone(), Phase::Ended), Verdict::Ignored, "{signal:?}");
    }
}

#[test]
fn connected_opens_the_session() {
    for phase in [RUNNING, LINKING] {
        assert_eq!(judge(Signal::Connected, phase), Verdict::Opened, "{phase:?}");
    }
}

#[test]
fn a_temporary_ban_is_waited_out_from_when_it_came() {
    let now = Instant::now();
    for phase in [RUNNING, LINKING] {
        let signal = Signal::TempBan { expire: Duration::from_secs(90), code: "Spam".into() };
        assert_eq!(
            verdict(signal, phase, now),
            Verdict::Ends(Outcome::TempBan {
                until: now + Duration::from_secs(90),
                reason: "temporarily banned (Spam) for 90s".into()
            }),
            "{phase:?}"
        );
    }
}

#[test]
fn connect_failures_by_code() {
    let cases = [
        (401, true, terminal(SessionState::LoggedOut, "logged out (401)")),
        (406, true, terminal(SessionState::LoggedOut, "logged out (406)")),
        (500, true, terminal(SessionState::LoggedOut, "logged out (500)")),
        (402, false, terminal(SessionState::Banned, "banned (402)")),
        (406, false, terminal(SessionState::Banned, "banned (406)")),
        (429, false, retry("rate limited (429)", true)),
        (503, false, retry("connect refused (503)", false)),
        (400, false, retry("connect refused (400)", false)),
        (777, false, retry("connect refused (777)", false)),
    ];
    for phase in [RUNNING, LINKING] {
        for (code, logged_out, expected) in &cases {
            let got = judge(Signal::ConnectFailure { code: *code, logged_out: *logged_out }, phase);
            assert_eq!(&got, expected, "{code} {logged_out} {phase:?}");
        }
    }
}

#[test]
fn a_qr_code_ends_the_handshake_and_is_shown_only_while_linking() {
    let qr = || Signal::Qr { code: "2@q".into(), valid_for: Duration::from_secs(20) };
    assert_eq!(judge(qr(), RUNNING), Verdict::HandshakeOver { qr: None });
    assert_eq!(judge(qr(), LINKING), Verdict::HandshakeOver { qr: Some(("2@q".into(), Duration::from_secs(20))) });
}

#[test]
fn pairing_counts_only_while_linking() {
    let paired = || Signal::Paired { jid: "1@s.whatsapp.net".into() };
    assert_eq!(judge(paired(), LINKING), Verdict::Paired { jid: "1@s.whatsapp.net".into() });
    assert_eq!(judge(paired(), RUNNING), Verdict::Ignored);
    for phase in [RUNNING, LINKING] {
        assert_eq!(judge(Signal::PairFailed("bad".into()), phase), Verdict::PairFailed("bad".into()), "{phase:?}");
    }
}

#[test]
fn qr_codes_running_out_expire_a_link_attempt_once_disconnected() {
    assert_eq!(judge(Signal::QrExhausted { disconnected: true }, LINKING), Verdict::Ends(Outcome::LinkExpired));
    assert_eq!(judge(Signal::QrExhausted { disconnected: false }, LINKING), Verdict::Ignored);
    assert_eq!(judge(Signal::QrExhausted { disconnected: true }, RUNNING), Verdict::Ignored);
}

#[test]
fn connect_failure_reasons_carry_whatsapps_codes() {
    let cases = [
        (ConnectFailureReason::Generic, 400),
        (ConnectFailureReason::LoggedOut, 401),
        (ConnectFailureReason::TempBanned, 402),
        (ConnectFailureReason::AccountLocked, 403),
        (ConnectFailureReason::ClientOutdated, 405),
        (ConnectFailureReason::UnknownLogout, 406),
        (ConnectFailureReason::BadUserAgent, 409),
        (ConnectFailureReason::CatExpired, 413),
        (ConnectFailureReason::CatInvalid, 414),
        (ConnectFailureReason::NotFound, 415),
        (ConnectFailureReason::ClientUnknown, 418),
        (ConnectFailureReason::InternalServerError, 500),
        (ConnectFailureReason::Experimental, 501),
        (ConnectFailureReason::ServiceUnavailable, 503),
        (ConnectFailureReason::Unknown(499), 499),
    ];
    for (reason, code) in cases {
        assert_eq!(reason_code(&reason), code, "{reason:?}");
    }
}

#[test]
fn heard_keeps_endings_and_reasons_and_hands_back_the_rest() {
    let mut heard = Heard::default();
    assert_eq!(heard.note(Verdict::Lost("reset".into())), None);
    assert_eq!(heard.note(Verdict::StreamError("503".into())), None);
    assert_eq!(heard.note(Verdict::Ignored), None);
    assert_eq!(heard.note(retry("rate limited (429)", true)), None);
    assert_eq!(heard.note(terminal(SessionState::LoggedOut, "logged out (401)")), None);
    assert_eq!(
        heard.ending,
        Some(Outcome::Terminal { state: SessionState::LoggedOut, reason: "logged out (401)".into() }),
        "the latest ending holds"
    );
    for kept in [
        Verdict::Opened,
        Verdict::HandshakeOver { qr: None },
        Verdict::Paired { jid: "j".into() },
        Verdict::PairFailed("bad".into()),
    ] {
        assert_eq!(heard.note(kept.clone()), Some(kept));
    }
}

const STABLE: Duration = Duration::from_secs(60);

fn heard(lost: Option<&str>, stream_error: Option<&str>) -> Heard {
    let mut heard = Heard::default();
    if let Some(r) = lost {
        heard.note(Verdict::Lost(r.into()));
    }
    if let Some(c) = stream_error {
        heard.note(Verdict::StreamError(c.into()));
    }
    heard
}

fn retry_outcome(reason: &str, rate_limited: bool) -> Outcome {
    Outcome::Retry { reason: reason.into(), rate_limited }
}

#[test]
fn a_connection_that_never_opened_counts_a_failure() {
    let cases = [
        (heard(None, None), 0, retry_outcome("connect failed", false)),
        (heard(Some("reset"), None), 0, retry_outcome("connect failed", false)),
        (heard(None, Some("503")), 0, retry_outcome("stream error 503 before open", false)),
        (heard(None, Some("503")), 503, retry_outcome("connect refused (HTTP 503)", false)),
        (heard(None, None), 429, retry_outcome("connect refused (HTTP 429)", true)),
    ];
    for (heard, refused, expected) in cases {
        assert_eq!(heard.run_ended(None, STABLE, refused), (expected, Failures::Count));
    }
}

#[test]
fn a_connection_that_went_down_is_retried_and_a_stable_one_resets_the_count() {
    let short = Some(Duration::from_secs(5));
    let long = Some(STABLE);
    let cases = [
        (heard(None, None), short, 0, retry_outcome("connection closed", false), Failures::Keep),
        (heard(Some("reset"), None), short, 0, retry_outcome("connection lost: reset", false), Failures::Keep),
        (heard(Some("reset"), Some("503")), short, 0, retry_outcome("stream error 503", false), Failures::Keep),
        (heard(None, None), long, 0, retry_outcome("connection closed", false), Failures::Reset),
        (heard(None, None), short, 429, retry_outcome("connection closed", true), Failures::Keep),
    ];
    for (heard, open_for, refused, expected, failures) in cases {
        assert_eq!(heard.run_ended(open_for, STABLE, refused), (expected, failures));
    }
}

#[test]
fn a_restart_after_open_is_no_failure() {
    for open_for in [Duration::ZERO, STABLE] {
        let (outcome, failures) = heard(Some("reset"), Some("515")).run_ended(Some(open_for), STABLE, 429);
        assert_eq!((outcome, failures), (Outcome::Again, Failures::Reset));
    }
    let (outcome, failures) = heard(None, Some("515")).run_ended(None, STABLE, 0);
    assert_eq!((outcome, failures), (retry_outcome("stream error 515 before open", false), Failures::Count));
}

#[test]
fn engine_events_become_signals() {
    use whatsapp_rust::types::events::{
        ConnectFailure, Connected, PairingQrCode, PairingQrCodesExhausted, StreamError, StreamReplaced,
    };
    let cases = [
        (Event::Connected(Connected::builder().build()), Some(Signal::Connected)),
        (Event::StreamReplaced(StreamReplaced::builder().build()), Some(Signal::Replaced)),
        (
            Event::StreamError(StreamError::builder().code("515".to_string()).build()),
            Some(Signal::StreamError("515".into())),
        ),
        (
            Event::ConnectFailure(ConnectFailure::builder().reason(ConnectFailureReason::LoggedOut).build()),
            Some(Signal::ConnectFailure { code: 401, logged_out: true }),
        ),
        (
            Event::ConnectFailure(ConnectFailure::builder().reason(ConnectFailureReason::TempBanned).build()),
            Some(Signal::ConnectFailure { code: 402, logged_out: false }),
        ),
        (
            Event::PairingQrCode(
                PairingQrCode::builder().code("2@q".to_string()).timeout(Duration::from_secs(20)).build(),
            ),
            Some(Signal::Qr { code: "2@q".into(), valid_for: Duration::from_secs(20) }),
        ),
        (
            Event::PairingQrCodesExhausted(PairingQrCodesExhausted::builder().disconnected(true).build()),
            Some(Signal::QrExhausted { disconnected: true }),
        ),
    ];
    for (event, expected) in cases {
        assert_eq!(Signal::of(&event), expected, "{event:?}");
    }
}
