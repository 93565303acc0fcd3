//! Scenario 8: takeovers while contacts keep writing. Each tenant has a contact that messages it all the time
//! (every message changes the device's Signal session, so every delivery is a credential write); meanwhile
//! hosts are SIGKILLed and SIGSTOPped, their tenants taken over, and one tenant is logged out on its lease
//! holder. Then every host stops, every data dir is wiped, and one host restores everything from Firestore:
//! every contact's next normal (`msg`) message must decrypt there with no retry receipt (a Signal session state
//! the store acknowledged and then lost, or a stale owner's batch accepted over a newer one, shows up as a
//! message the restored device cannot decrypt), and the logged-out tenant must stay gone.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use wa_sim::ReceiptKind;
use wakeeper_shared::domain::{SessionState, TenantId, TenantStatus};
use wakeeper_shared::host_api::{ClientError, SendMessageRequest};
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::fleet::*;
use super::*;

const STEP: Duration = Duration::from_secs(30);

// Not in `cargo test` yet: its short form failed 2 of 18 runs on 3b956a5. In both, a host that took tenants from a
// paused one hydrated, for one or more tenants, a snapshot with no session for the contact ("No session found for
// msg message from pn#..." at engine debug, and "LID-PN cache warm-up: no entries found in storage"). Likely: the
// engine keeps LID-PN mappings learned from offline messages in memory only (`learn_lid_pn_mapping_fast`) while
// it migrates the session to the LID address durably. Open under issue 17; `scripts/chaos` runs it
// (`--include-ignored`; engine logs with WAKEEPER_TEST_HOST_LOG=info,whatsapp_rust=debug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "an unexplained undecryptable message in some short runs; run by scripts/chaos"]
async fn takeovers_under_writes_lose_no_acknowledged_state() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(150 + 90 * settings.fleet_trials as u64);
    tokio::time::timeout(limit, takeover_under_writes(&settings)).await.expect("chaos scenario timed out");
}

fn phone(i: usize) -> String {
    format!("4915144440{i:03}")
}

/// The member whose session of `id` is open, if exactly one is.
async fn holder_of(members: &[Member], id: &TenantId) -> Option<usize> {
    let mut open = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if m.states().await.get(id) == Some(&SessionState::Open) {
            open.push(i);
        }
    }
    (open.len() == 1).then(|| open[0])
}

/// The contact and the bot exchange a message each, so that the contact's later messages are normal ones on
/// the established session.
async fn first_exchange(wa: &wa_sim::SimHandle, members: &[Member], id: &TenantId, phone: &str) {
    let device = wa.device_jid(id).expect("the sim knows the device");
    let msg = wa.contact_send_text(phone, &device, "hello").await.unwrap();
    wa.wait_for_receipt(phone, STEP, |r| r.message_id == msg && r.kind == ReceiptKind::Delivery)
        .await
        .unwrap_or_else(|e| panic!("set-up: {id} did not take the first message: {e}"));
    let holder = holder_of(members, id).await.expect("set-up: one holder");
    let request = SendMessageRequest { to: format!("+{phone}"), text: "welcome".into(), typing_ms: None };
    let sent = members[holder].host.client.send_message(id, &request).await.expect("set-up: the bot answers");
    let got = wa.wait_for_contact_message(phone, STEP, |m| m.id == sent.message_id).await.unwrap();
    assert!(got.error.is_none(), "set-up: the contact decrypts the bot's answer: {got:?}");
}

/// Logs `id` out on whichever host holds its lease (409 `lease_held` elsewhere, or while it moves).
async fn logout_on_holder(members: &[Member], id: &TenantId) -> Result<&'static str, String> {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(h) = holder_of(members, id).await {
            match members[h].host.client.logout(id).await {
                Ok(()) => return Ok(members[h].name),
                Err(ClientError::Refused { status: 409, .. }) => {}
                Err(e) => return Err(format!("logout on {}: {e}", members[h].name)),
            }
        }
        if Instant::now() > deadline {
            return Err("no host held the lease to log out on".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn takeover_under_writes(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("chaoswrites", dirs_a.cipher()).await else { return };
    let n = settings.fleet_tenants.max(2);
    let ids: Vec<TenantId> = (0..n).map(|i| tid(&format!("writes-{i:02}"))).collect();
    stores.seed(&wa, &ids).await;
    for i in 0..n {
        wa.add_contact(&phone(i)).unwrap();
    }
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let env = fleet_env(&stores);
    let mut members =
        vec![Member::start("host-a", dirs_a, &wa.url(), env.clone()), Member::start("host-b", dirs_b, &wa.url(), env)];
    for m in &members {
        m.host.ready().await;
    }
    let mut watch = Watch::default();
    let (off, _) = watch.converge(&members, &wa, &ids, Duration::from_secs(60)).await;
    assert_eq!(off, 0, "set-up: every tenant open on one host");
    for (i, id) in ids.iter().enumerate() {
        first_exchange(&wa, &members, id, &phone(i)).await;
    }

    // The contacts write all the time, round robin, from here to the final stop.
    let logged_out: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (wa, ids, logged_out, writing) = (wa.clone(), ids.clone(), logged_out.clone(), writing.clone());
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0u64, 0u64);
            let mut k = 0usize;
            while writing.load(Ordering::SeqCst) {
                let i = k % ids.len();
                k += 1;
                if logged_out.lock().unwrap().contains(&i) {
                    continue;
                }
                let device = wa.device_jid(&ids[i]).unwrap();
                match wa.contact_send_text(&phone(i), &device, &format!("order {k}")).await {
                    Ok(_) => sent += 1,
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            (sent, failed)
        })
    };

    let mut c = Counts::default();
    let pause_for = ttl * 5 / 2;
    let failover_limit = ttl * 3 + Duration::from_secs(20);
    let (mut not_open, mut kicks_in_pauses, mut kicks_outside) = (0u64, 0u64, 0u64);
    let mut logout: Option<(usize, &'static str, u64)> = None;
    let mut kicks_before = kicks(&wa);
    let live_ids = |lo: &BTreeSet<usize>| -> Vec<TenantId> {
        ids.iter().enumerate().filter(|(i, _)| !lo.contains(i)).map(|(_, id)| id.clone()).collect()
    };
    for round in 0..settings.fleet_trials {
        let (victim, other) = (round % 2, 1 - round % 2);
        tokio::time::sleep(Duration::from_millis(random_ms(1500))).await;
        members[victim].kill().await;
        let live = live_ids(&logged_out.lock().unwrap());
        not_open += watch.converge(&members, &wa, &live, failover_limit).await.0 as u64;
        members[victim].restart().await;
        not_open += watch.converge(&members, &wa, &live, failover_limit).await.0 as u64;
        if round == 0 {
            // The logout, on the holder, while everything moves: tenant 0 must never come back.
            let t = 0usize;
            let jid = wa.device_jid(&ids[t]).unwrap();
            let on = logout_on_holder(&members, &ids[t]).await.expect("the logout on the lease holder");
            logged_out.lock().unwrap().insert(t);
            watch.logged_out.insert(ids[t].clone());
            let logins = wa.device(&jid).map_or(0, |d| d.logins);
            logout = Some((t, on, logins));
        }
        let live = live_ids(&logged_out.lock().unwrap());
        // The other host, which took every tenant at the kill, is paused past its lease; the restarted one takes
        // them all over.
        kicks_outside += kicks_between(&kicks_before, &kicks(&wa));
        let before_pause = kicks(&wa);
        members[other].pause();
        let paused_at = Instant::now();
        not_open += watch.converge(&members, &wa, &live, failover_limit).await.0 as u64;
        if paused_at.elapsed() < pause_for {
            tokio::time::sleep(pause_for - paused_at.elapsed()).await;
        }
        kicks_before = kicks(&wa);
        kicks_in_pauses += kicks_between(&before_pause, &kicks_before);
        members[other].resume();
        not_open += watch.converge(&members, &wa, &live, failover_limit).await.0 as u64;
        watch.observe(&members, &wa, &live, ttl * 2).await;
    }
    writing.store(false, Ordering::SeqCst);
    let (sent, send_failed) = writer.await.unwrap();
    kicks_outside += kicks_between(&kicks_before, &kicks(&wa));
    let live_idx: Vec<usize> = (0..n).filter(|i| !logged_out.lock().unwrap().contains(i)).collect();
    let live = live_ids(&logged_out.lock().unwrap());
    // Let the last deliveries be answered before the hosts stop (messages delivered into a killed host's socket
    // never are: the deadline bounds the wait).
    let receipts_of = |i: usize| wa.contact_receipts(&phone(i));
    let unanswered = |i: usize| {
        let got: BTreeSet<String> = receipts_of(i)
            .into_iter()
            .filter(|r| matches!(r.kind, ReceiptKind::Delivery | ReceiptKind::Inactive | ReceiptKind::Retry))
            .map(|r| r.message_id)
            .collect();
        wa.contact_sent(&phone(i)).iter().filter(|s| !got.contains(&s.id)).count()
    };
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle && live_idx.iter().any(|i| unanswered(*i) > 0) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let unanswered_before: usize = live_idx.iter().map(|i| unanswered(*i)).sum();
    let retries = |i: usize| receipts_of(i).iter().filter(|r| r.kind == ReceiptKind::Retry).count();
    let retries_during: usize = live_idx.iter().map(|i| retries(*i)).sum();

    // Every host stopped, every disk wiped, one host restores all from the store.
    for m in members.iter_mut() {
        m.stop().await;
    }
    for m in &members {
        m.dirs.wipe_data();
    }
    members[0].restart().await;
    let (off, restored_in) = watch.converge(&members[..1], &wa, &live, Duration::from_secs(60)).await;
    let not_restored = off as u64;
    let retries_before_next: usize = live_idx.iter().map(|i| retries(*i)).sum();
    // Each contact's next normal message: decrypted (a delivery receipt), never a retry receipt.
    let mut not_normal = 0u64;
    let mut next_ids = Vec::new();
    for &i in &live_idx {
        let device = wa.device_jid(&ids[i]).unwrap();
        let msg = wa.contact_send_text(&phone(i), &device, "the next order").await.unwrap();
        let enc = wa.contact_sent(&phone(i)).into_iter().find(|s| s.id == msg).map(|s| s.enc_type);
        if enc.as_deref() != Some("msg") {
            println!("    {}: the next message went as {enc:?}, not a normal `msg`", ids[i]);
            not_normal += 1;
        }
        next_ids.push((i, msg));
    }
    let mut undecrypted: BTreeSet<String> = BTreeSet::new();
    for (i, msg) in &next_ids {
        let receipt = wa
            .wait_for_receipt(&phone(*i), STEP, |r| {
                &r.message_id == msg
                    && matches!(r.kind, ReceiptKind::Delivery | ReceiptKind::Inactive | ReceiptKind::Retry)
            })
            .await;
        if !matches!(&receipt, Ok(r) if r.kind != ReceiptKind::Retry) {
            println!("    {}: the next message after the restore: {receipt:?}", ids[*i]);
            undecrypted.insert(msg.clone());
        }
    }
    // A retry receipt may trail a delivery receipt: look once more after the last one arrived.
    for (i, msg) in &next_ids {
        if receipts_of(*i).iter().any(|r| &r.message_id == msg && r.kind == ReceiptKind::Retry) {
            undecrypted.insert(msg.clone());
        }
    }
    let never_answered: usize = live_idx.iter().map(|i| unanswered(*i)).sum();
    let retries_after: usize = live_idx.iter().map(|i| retries(*i)).sum();
    let backlog_retries = retries_before_next.saturating_sub(retries_during);
    let (write_above, fence_above, compared) = fence_above_lease(&stores, &live).await;

    // The logged-out tenant: no credentials, no session, no login since the logout.
    let mut resurrected = 0u64;
    let (t, logout_on, logins_at_logout) = logout.expect("the logout ran");
    let t_id = &ids[t];
    let creds_back = !matches!(stores.creds.read(t_id).await, Err(StoreError::NotFound));
    let session_back = members[0].states().await.get(t_id).is_some_and(|s| !s.is_terminal());
    let logins_since = wa.device(&wa.device_jid(t_id).unwrap()).map_or(0, |d| d.logins) - logins_at_logout;
    for (what, back) in [
        ("credentials in the store after the final restore", creds_back),
        ("a session on the restoring host", session_back),
        ("a login since the logout", logins_since > 0),
    ] {
        if back {
            println!("    logged-out tenant {t_id} resurrected: {what}");
            resurrected += 1;
        }
    }
    let t_record = stores.tenants.get(t_id).await.unwrap().expect("the tenant's record");
    members[0].stop().await;
    let marked = marked_in_table(stores.tenants.as_ref(), &live).await;

    c.info("tenants (each with a contact writing to it)", n);
    c.info(
        &format!("rounds (a host SIGKILLed and restarted, the other SIGSTOPped {:.0} s)", pause_for.as_secs_f64()),
        settings.fleet_trials,
    );
    c.info("messages the contacts sent during the faults", sent);
    c.info("sends the server refused during the faults", send_failed);
    c.info("retry receipts during the faults (a host that could not decrypt)", retries_during);
    c.info("messages with no receipt when the faults ended", unanswered_before);
    c.zero(&format!("tenants not open on exactly one host {failover_limit:?} after each fault"), not_open);
    c.info("frozen connections the server knocked off when the taker logged in (inherent)", kicks_in_pauses);
    c.zero("logins that knocked a live connection off while no host was paused (two owners)", kicks_outside);
    watch.report(&mut c);
    c.zero("tenants not restored by the one host from the store (disks wiped)", not_restored);
    c.info("time from the restoring host's start to every tenant open", format!("{:.2} s", restored_in.as_secs_f64()));
    c.info("retry receipts for queued messages delivered after the restore", backlog_retries);
    c.zero("next messages after the restore that were not normal (`msg`)", not_normal);
    c.zero(
        "next normal messages the restored devices could not decrypt (retry or no receipt)",
        undecrypted.len() as u64,
    );
    c.info("messages never answered by any host (delivered into a killed or frozen host's socket)", never_answered);
    c.info("retry receipts in all after the restore", retries_after.saturating_sub(retries_before_next));
    c.info("tenants whose store fence was compared with their lease", compared);
    c.zero("tenants whose stored write_epoch is above their lease epoch", write_above);
    c.zero("tenants whose store fence (max_epoch) is above their lease epoch", fence_above);
    c.info("the logout ran on", logout_on);
    c.zero("logged-out tenants resurrected (credentials, session or login after the logout)", resurrected);
    c.zero(
        "logged-out tenants not marked logged_out in the table",
        u64::from(t_record.status != Some(TenantStatus::LoggedOut) || t_record.whatsapp_connected),
    );
    c.zero("other tenants marked or not desired in the tenant table at the end", marked.len() as u64);
    report_metrics(&mut c, &members);
    if let Some(first) = marked.first().or(watch.replaced.first()).or(watch.terminal.first()) {
        tenant_story(&members, first.as_str(), 60);
    }
    sim.shutdown().await;
    c.finish(&format!(
        "takeovers under writes, {} rounds, then every disk wiped and one restore",
        settings.fleet_trials
    ));
}
