//! The operator's commands against a running host, through the typed control-API client:
//! `socket-host link --tenant ID [--phone N]` shows the QR code in the terminal (and the pairing code) and waits
//! for the scan; `socket-host sessions [--tenant ID]` prints the sessions as a table.
//!
//! The host is at `--url` (default `http://<--listen>`); the token comes from the usual settings
//! (`WAKEEPER_CONTROL_TOKEN`, `WAKEEPER_CONTROL_TOKEN_FILE`, or the data dir's `control.token`), read, never
//! created.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use wakeeper_shared::domain::{SessionView, TenantId, now_millis};
use wakeeper_shared::host_api::{ClientError, HostClient, LinkRequest, LinkStatus, LinkView};

use crate::config::Config;

/// `socket-host link`.
#[derive(Debug, Clone, clap::Args)]
pub struct LinkArgs {
    /// The tenant to link a number for.
    #[arg(long)]
    pub tenant: String,
    /// Also ask for a pairing code for this phone number (international form, e.g. 15551234567).
    #[arg(long)]
    pub phone: Option<String>,
    /// The host's base URL (default: http://<listen address>).
    #[arg(long)]
    pub url: Option<String>,
    /// Give up waiting after this many seconds (the attempt goes on on the host until its QR codes run out).
    #[arg(long, default_value_t = 300)]
    pub wait_s: u64,
}

/// `socket-host sessions`.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionsArgs {
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// The host's base URL (default: http://<listen address>).
    #[arg(long)]
    pub url: Option<String>,
}

fn client(config: &Config, url: Option<&str>) -> anyhow::Result<HostClient> {
    let base = url.map(str::to_owned).unwrap_or_else(|| format!("http://{}", config.listen));
    let token = crate::app::existing_control_token(config)?.with_context(|| {
        format!(
            "no control token: set WAKEEPER_CONTROL_TOKEN or WAKEEPER_CONTROL_TOKEN_FILE (none in {})",
            config.data_dir.display()
        )
    })?;
    Ok(HostClient::new(&base, token, Duration::from_secs(30))?)
}

/// A client error in the operator's words.
fn explain(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Unauthorized => {
            anyhow::anyhow!("the host refused the control token (401 unauthorized): check WAKEEPER_CONTROL_TOKEN")
        }
        e => e.into(),
    }
}

fn tenant(raw: &str) -> anyhow::Result<TenantId> {
    TenantId::parse(raw).map_err(|e| anyhow::anyhow!("--tenant: {e}"))
}

/// Starts (or joins) a link attempt and follows it until it ends: each new QR code is drawn, the pairing code
/// printed once. Returns an error unless the phone paired.
pub async fn link(config: &Config, args: &LinkArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let id = tenant(&args.tenant)?;
    let client = client(config, args.url.as_deref())?;
    let mut view = client.link(&id, &LinkRequest { phone: args.phone.clone() }).await.map_err(explain)?;
    writeln!(out, "Linking a number for tenant {id}. On the phone: WhatsApp > Linked devices > Link a device.")?;
    let deadline = Instant::now() + Duration::from_secs(args.wait_s);
    let (mut shown_qr, mut shown_code) = (None::<String>, false);
    loop {
        if view.status == LinkStatus::Waiting {
            if view.qr.is_some() && view.qr != shown_qr {
                draw_qr(&view, out)?;
                shown_qr = view.qr.clone();
            }
            if let (Some(code), false) = (&view.pairing_code, shown_code) {
                writeln!(out, "Or enter this code on the phone (Link with phone number instead): {code}")?;
                shown_code = true;
            }
            out.flush()?;
        } else {
            return finish(&view, out);
        }
        if Instant::now() > deadline {
            anyhow::bail!("no scan within {} s (the attempt goes on on the host)", args.wait_s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        match client.link_view(&id).await.map_err(explain)? {
            Some(v) => view = v,
            None => anyhow::bail!("the host no longer has a link attempt for {id}"),
        }
    }
}

fn draw_qr(view: &LinkView, out: &mut impl Write) -> anyhow::Result<()> {
    let payload = view.qr.as_deref().unwrap_or_default();
    let code = qrcode::QrCode::with_error_correction_level(payload.as_bytes(), qrcode::EcLevel::L)
        .context("drawing the QR code")?;
    // Two modules per character cell, light on dark as phones read a terminal best either way.
    let text = code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    writeln!(out, "\n{text}")?;
    match view.expires_in_s {
        Some(s) => writeln!(out, "Scan it within {s} s; a new one follows.")?,
        None => writeln!(out, "Scan it.")?,
    }
    Ok(())
}

fn finish(view: &LinkView, out: &mut impl Write) -> anyhow::Result<()> {
    match view.status {
        LinkStatus::Paired => {
            let device = view.device_jid.as_deref().unwrap_or("(unknown)");
            writeln!(out, "Paired: {} is linked as {device}; its session is {}.", view.tenant_id, view.state.as_str())?;
            Ok(())
        }
        status => {
            let why = view.error.as_deref().unwrap_or("no reason given");
            anyhow::bail!("the link attempt ended {status:?}: {why}")
        }
    }
}

/// Prints the host's sessions (or one) as a table.
pub async fn sessions(config: &Config, args: &SessionsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let client = client(config, args.url.as_deref())?;
    let rows: Vec<SessionView> = match &args.tenant {
        Some(raw) => {
            let id = tenant(raw)?;
            let view = client
                .session(&id)
                .await
                .map_err(explain)?
                .with_context(|| format!("the host runs no session of {id}"))?;
            vec![view]
        }
        None => {
            let list = client.sessions().await.map_err(explain)?;
            for fault in &list.host_errors {
                writeln!(out, "host fault {}: {}", fault.code, fault.message)?;
            }
            list.sessions
        }
    };
    write_table(&rows, now_millis(), out)?;
    Ok(())
}

/// The table `sessions` prints: one row per session, the columns an operator looks at first.
pub fn write_table(rows: &[SessionView], now_ms: i64, out: &mut impl Write) -> std::io::Result<()> {
    let header = ["TENANT", "STATE", "FOR", "RECONNECTS", "FAILURES", "LEASE", "LAST ERROR"];
    let mut table: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for s in rows {
        let lease = match &s.lease {
            Some(l) if l.held => format!("{} #{}", l.owner, l.epoch),
            Some(l) => format!("({} #{})", l.owner, l.epoch),
            None => "-".into(),
        };
        table.push([
            s.tenant_id.to_string(),
            s.state.as_str().to_owned(),
            human_duration(now_ms.saturating_sub(s.since_ms).max(0) as u64),
            s.reconnects.to_string(),
            s.consecutive_failures.to_string(),
            lease,
            s.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|c| table.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

/// `4s`, `12m`, `3h`, `2d`: how long a session has been in its state, coarsely.
fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use wakeeper_shared::domain::{SessionLease, SessionState};

    use super::*;

    #[test]
    fn the_table_lines_up_and_shows_the_lease_and_the_last_error() {
        let mut a = SessionView::new(TenantId::parse("cantina-1").unwrap(), SessionState::Open, 1_000);
        a.lease = Some(SessionLease { owner: "host-a".into(), epoch: 3, held: true });
        let mut b = SessionView::new(TenantId::parse("b").unwrap(), SessionState::Backoff, 61_000);
        b.reconnects = 12;
        b.consecutive_failures = 2;
        b.last_error = Some("connect timed out".into());
        let mut out = Vec::new();
        write_table(&[a, b], 7_201_000, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TENANT     STATE    FOR  RECONNECTS"), "{text}");
        assert!(lines[1].starts_with("cantina-1  open     2h   0"), "{text}");
        assert!(lines[1].contains("host-a #3"), "{text}");
        assert!(lines[2].starts_with("b          backoff  1h   12"), "{text}");
        assert!(lines[2].ends_with("connect timed out"), "{text}");
    }

    #[test]
    fn durations_are_coarse() {
        assert_eq!(human_duration(59_999), "59s");
        assert_eq!(human_duration(60_000), "1m");
        assert_eq!(human_duration(7_200_000), "2h");
        assert_eq!(human_duration(3 * 86_400_000), "3d");
    }
}
