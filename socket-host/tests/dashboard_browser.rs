//! The dashboard in a real headless Chromium: it loads with the token, shows the sessions of a host running
//! against the fake server and the QR code of a link attempt as an image; screenshots are kept under the
//! test's output directory.

use std::process::Command;
use std::time::Duration;

use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

fn chromium() -> Option<&'static str> {
    if std::path::Path::new("/usr/bin/chromium").exists() {
        return Some("/usr/bin/chromium");
    }
    assert_eq!(
        std::env::var("WAKEEPER_SKIP_BROWSER_TESTS").as_deref(),
        Ok("1"),
        "/usr/bin/chromium is missing: run scripts/setup (or set WAKEEPER_SKIP_BROWSER_TESTS=1)"
    );
    None
}

fn headless(bin: &str, profile: &std::path::Path, extra: &[String], url: &str) -> std::process::Output {
    Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=8000",
            "--window-size=1200,600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_sessions_in_headless_chromium() {
    let Some(bin) = chromium() else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = [tid("trattoria-roma"), tid("sushi-bar"), tid("taqueria")];
    seed_embedded(&dirs, &wa, &tenants).await;
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    host.all_open(3, Duration::from_secs(30)).await;

    let url = format!("{}/dashboard#token={TOKEN}", host.base);
    let out_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out_dir).unwrap();
    let (bin, url2) = (bin.to_string(), url.clone());
    let profile = dirs.root.path().join("chromium-dom");
    let dom =
        tokio::task::spawn_blocking(move || headless(&bin, &profile, &["--dump-dom".into()], &url2)).await.unwrap();
    let html = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        html.contains(r#"data-loaded="true""#),
        "page never loaded its data: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for t in &tenants {
        assert!(html.contains(&format!(r#"data-tenant="{t}""#)), "row for {t} missing");
    }
    assert_eq!(html.matches(r#"class="state open""#).count(), 3, "three open sessions shown");
    assert!(!html.contains(TOKEN), "the token never lands in the page");

    let shot = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile = dirs.root.path().join("chromium-shot");
    let arg = format!("--screenshot={}", shot.display());
    let bin = chromium().unwrap().to_string();
    tokio::task::spawn_blocking(move || headless(&bin, &profile, &[arg], &url)).await.unwrap();
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    println!("dashboard screenshot: {}", shot.display());

    // Without a token the page asks for one and shows no data.
    let profile = dirs.root.path().join("chromium-anon");
    let anon_url = format!("{}/dashboard", host.base);
    let bin = chromium().unwrap().to_string();
    let anon =
        tokio::task::spawn_blocking(move || headless(&bin, &profile, &["--dump-dom".into()], &anon_url)).await.unwrap();
    let anon = String::from_utf8_lossy(&anon.stdout);
    assert!(!anon.contains("data-tenant="), "no sessions shown without the token");

    // A link attempt started through the API: the page shows its QR code as an image.
    let linking = tid("new-bakery");
    let link_client = wakeeper_shared::host_api::HostClient::new(&host.base, TOKEN, Duration::from_secs(30)).unwrap();
    let view = link_client.link(&linking, &Default::default()).await.unwrap();
    assert!(view.qr_svg.is_some());
    let url = format!("{}/dashboard#token={TOKEN}", host.base);
    let (bin, url2) = (chromium().unwrap().to_string(), url.clone());
    let profile = dirs.root.path().join("chromium-link-dom");
    let dom =
        tokio::task::spawn_blocking(move || headless(&bin, &profile, &["--dump-dom".into()], &url2)).await.unwrap();
    let html = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(html.contains(r#"data-loaded="true""#), "page never loaded: {}", String::from_utf8_lossy(&dom.stderr));
    assert!(html.contains(r#"<span class="state linking">linking</span>"#), "the linking session is listed");
    let card = html.split(r#"data-link="new-bakery""#).nth(1).expect("a link card for the attempt");
    let card = card.split("</div></div>").next().unwrap_or(card);
    assert!(card.contains(r#"data-status="waiting""#) || html.contains(r#"data-status="waiting""#));
    assert!(card.contains(r#"<img class="qr""#), "the QR code is shown as an image: {card}");
    assert!(card.contains("src=\"data:image/svg+xml;base64,"), "rendered from the host's SVG: {card}");
    assert!(!html.contains(TOKEN));
    let shot = out_dir.join("dashboard-link.png");
    let _ = std::fs::remove_file(&shot);
    let profile = dirs.root.path().join("chromium-link-shot");
    let arg = format!("--screenshot={}", shot.display());
    let bin = chromium().unwrap().to_string();
    tokio::task::spawn_blocking(move || headless(&bin, &profile, &[arg, "--window-size=1200,900".into()], &url))
        .await
        .unwrap();
    let png = std::fs::read(&shot).expect("screenshot of the link written");
    assert!(png.starts_with(b"\x89PNG"));
    println!("dashboard link screenshot: {}", shot.display());
    drop(host);
    sim.shutdown().await;
}
