//! The Lambda figures: bootstrap sizes (when built), cold-start init times of the native release builds in
//! three configurations, and the floor under them (starting any process on this machine).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::json;

use crate::system::on_cpu_ms;
use crate::table::Table;
use crate::{Bench, TOKEN};

/// coreutils' `nice`, by path (the measured processes get an empty environment).
const NICE: &str = if cfg!(target_os = "linux") { "/usr/bin/nice" } else { "nice" };

/// Bootstrap sizes (the arm64 builds of `scripts/build-functions`) and cold-start init times (the native release
/// builds beside this binary, see [`lambda_init`]).
pub async fn bench_lambda(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    bootstrap_sizes(bench, t);
    let runs = bench.args.lambda_cold_starts;
    for f in ["restore", "health-sweep"] {
        init_times(bench, t, f, runs).await?;
    }
    let (floor50, floor_max) = exec_floor_ms(bench.args.lambda_nice, runs)?;
    t.raw("lambda-exec-floor", json!({ "p50_ms": floor50, "max_ms": floor_max }));
    t.row(
        "Starting any process here (`nice /bin/true`, exec to exit), the floor under the init figures",
        format!("p50 {floor50:.1} ms, max {floor_max:.1} ms"),
        "",
        None,
    );
    t.note(format!(
        "Lambda init = what Lambda reports as Init Duration: from the bootstrap's exec to its first \
         `GET /2018-06-01/runtime/invocation/next` on a Runtime API stub on 127.0.0.1 (the process is then \
         killed: every start is cold, page cache warm), started through `nice -n {nice}` so that other load on \
         the machine time-shares it less (a Lambda init runs alone in its microVM); the target is judged on the \
         p50. `as deployed`: template.yaml's variables (token in Secrets Manager and, for the sweep, an SNS topic: \
         aws-config loaded from the environment, secrets fetched by the first invocation), AWS endpoints pointed \
         at a closed local port (any request at init would fail the start); `token given`: the same with the \
         token as a value (host clients built at init); `no AWS config`: DynamoDB endpoint and token given, as \
         scripts/invoke-local runs them. CPU = on-CPU time of all the process's threads at that moment.",
        nice = bench.args.lambda_nice
    ));
    Ok(())
}

/// The size of each function's arm64 bootstrap, zipped (by `cargo lambda build` or, failing that, by the bench).
fn bootstrap_sizes(bench: &Bench, t: &mut Table) {
    let dir = bench.args.lambda_dir.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("lambda")
    });
    for f in ["restore", "health-sweep"] {
        let zip = dir.join(f).join("bootstrap.zip");
        let raw = dir.join(f).join("bootstrap");
        let size = |p: &Path| std::fs::metadata(p).ok().map(|m| m.len() as f64 / 1_048_576.0);
        let (text, met) = match (size(&zip), size(&raw)) {
            (Some(z), r) => (
                format!("{z:.2} MiB zipped{}", r.map(|r| format!(", {r:.2} MiB unzipped")).unwrap_or_default()),
                Some(z <= 8.0),
            ),
            (None, Some(r)) => match zipped_size(&raw) {
                Some(z) => (format!("{z:.2} MiB zipped (deflate, by the bench), {r:.2} MiB unzipped"), Some(z <= 8.0)),
                None => (format!("{r:.2} MiB unzipped"), None),
            },
            (None, None) => (format!("not built ({})", dir.join(f).display()), None),
        };
        t.row(&format!("Lambda bootstrap `{f}` (arm64)"), text, "<= 8 MB zipped", met);
    }
}

/// The init-time row of function `f`: `runs` cold starts in each [`LambdaSetup`].
async fn init_times(bench: &Bench, t: &mut Table, f: &str, runs: usize) -> anyhow::Result<()> {
    let bin = bench.host_bin.with_file_name(f);
    ensure!(bin.exists(), "{} is not built (scripts/bench builds it: cargo build --release -p {f})", bin.display());
    let mut raw = serde_json::Map::new();
    let mut cells = Vec::new();
    let mut met = None;
    for setup in LambdaSetup::ALL {
        let starts = lambda_init(bench, &bin, f, setup, runs).await.with_context(|| format!("{f}, {setup:?}"))?;
        let mut wall: Vec<f64> = starts.iter().map(|s| s.wall_ms).collect();
        let mut cpu: Vec<f64> = starts.iter().map(|s| s.cpu_ms).collect();
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        let (p50, max, cpu50) = (wall[wall.len() / 2], wall[wall.len() - 1], cpu[cpu.len() / 2]);
        println!(
            "  {f} {setup:?}: init p50 {p50:.1} ms, max {max:.1} ms, first {:.1} ms, cpu p50 {cpu50:.1} ms",
            starts[0].wall_ms
        );
        cells.push(format!("{}: p50 {p50:.1} ms, max {max:.1} ms (CPU p50 {cpu50:.1} ms)", setup.label()));
        if setup == LambdaSetup::Deployed {
            met = Some(p50 <= 30.0);
        }
        raw.insert(
            format!("{setup:?}"),
            json!({ "wall_ms": starts.iter().map(|s| s.wall_ms).collect::<Vec<_>>(),
                    "cpu_ms": starts.iter().map(|s| s.cpu_ms).collect::<Vec<_>>() }),
        );
    }
    t.raw(&format!("lambda-init-{f}"), serde_json::Value::Object(raw));
    t.row(
        &format!("Lambda init `{f}` (native release build, exec -> first `GET /runtime/invocation/next`, {runs} cold starts each)"),
        cells.join("; "),
        "<= 30 ms",
        met,
    );
    Ok(())
}

/// What starting any process costs on this machine at this moment: `nice -n N /bin/true`, exec to exit, p50 and
/// max of `runs` (the floor under every init figure; a few ms on an idle machine).
fn exec_floor_ms(nice: i32, runs: usize) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let status =
            Command::new(NICE).arg("-n").arg(nice.to_string()).arg("/bin/true").stderr(Stdio::null()).status()?;
        ensure!(status.success(), "nice /bin/true: {status}");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[ms.len() - 1]))
}

/// The three configurations the init time is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LambdaSetup {
    /// template.yaml's variables: the control token in Secrets Manager, the real DynamoDB (aws-config loaded).
    Deployed,
    /// The same with the token given as a value (so the host clients are built at init).
    TokenGiven,
    /// A DynamoDB endpoint and the token given: aws-config never loaded (scripts/invoke-local's setup).
    NoAwsConfig,
}

impl LambdaSetup {
    const ALL: [LambdaSetup; 3] = [LambdaSetup::Deployed, LambdaSetup::TokenGiven, LambdaSetup::NoAwsConfig];

    fn label(self) -> &'static str {
        match self {
            LambdaSetup::Deployed => "as deployed",
            LambdaSetup::TokenGiven => "token given",
            LambdaSetup::NoAwsConfig => "no AWS config",
        }
    }
}

/// One cold start: wall time from exec to the first `next` request, and the process's CPU time by then.
struct ColdStart {
    wall_ms: f64,
    cpu_ms: f64,
}

/// The environment function `function` is started with in `setup`: Lambda's own variables, template.yaml's,
/// the Runtime API at `runtime_api`, and every AWS or host endpoint at `closed` (a port nothing listens on).
fn lambda_env(
    function: &str,
    setup: LambdaSetup,
    runtime_api: &str,
    closed: &str,
    home: &Path,
) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&str, String)> = vec![
        ("AWS_LAMBDA_RUNTIME_API", runtime_api.to_owned()),
        ("AWS_LAMBDA_FUNCTION_NAME", format!("wakeeper-{function}")),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/wakeeper-{function}")),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/28/[$LATEST]0123456789abcdef".into()),
        ("LAMBDA_TASK_ROOT", "/var/task".into()),
        ("HOME", home.display().to_string()),
        ("WAKEEPER_HOST_URLS", closed.to_owned()),
        ("WAKEEPER_DYNAMODB_TABLE", "wakeeper-TenantTable-0123456789".into()),
        ("WAKEEPER_HOST_TIMEOUT_S", "10".into()),
        ("WAKEEPER_LOG", "info".into()),
    ];
    let aws = [
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "ASIAWAKEEPERBENCH000".into()),
        ("AWS_SECRET_ACCESS_KEY", "wakeeper-bench-not-a-secret-0000000000000".into()),
        ("AWS_SESSION_TOKEN", "wakeeper-bench-session".into()),
        ("AWS_ENDPOINT_URL", closed.to_owned()),
    ];
    let token = ("WAKEEPER_CONTROL_TOKEN", TOKEN.to_string());
    match setup {
        LambdaSetup::Deployed => {
            env.extend(aws.iter().cloned());
            env.push((
                "WAKEEPER_CONTROL_TOKEN_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:wakeeper-control-token-AbCdEf".into(),
            ));
        }
        LambdaSetup::TokenGiven => {
            env.extend(aws.iter().cloned());
            env.push(token);
        }
        LambdaSetup::NoAwsConfig => {
            env.push(token);
            env.push(("WAKEEPER_DYNAMODB_ENDPOINT", closed.to_owned()));
        }
    }
    if function == "health-sweep" {
        env.extend([
            ("WAKEEPER_SWEEP_STUCK_AFTER_S", "300".to_string()),
            ("WAKEEPER_SWEEP_ALERT_AFTER", "3".into()),
            ("WAKEEPER_SWEEP_SILENT_AFTER_S", "120".into()),
        ]);
        if setup != LambdaSetup::NoAwsConfig {
            env.push(("WAKEEPER_ALERT_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:wakeeper-alerts".into()));
        }
    } else {
        env.push(("WAKEEPER_RESTORE_CONCURRENCY", "16".into()));
    }
    env
}

/// Starts `bin` `runs` times against a Runtime API stub and times each start to its first
/// `GET /2018-06-01/runtime/invocation/next` (Lambda's init phase ends there), then kills it.
async fn lambda_init(
    bench: &Bench,
    bin: &Path,
    function: &str,
    setup: LambdaSetup,
    runs: usize,
) -> anyhow::Result<Vec<ColdStart>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let app = axum::Router::new().route(
        "/2018-06-01/runtime/invocation/next",
        axum::routing::get(move || {
            let _ = tx.send(Instant::now());
            // Never answers: the measured process is killed while it waits for its first event.
            std::future::pending::<String>()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let runtime_api = listener.local_addr()?.to_string();
    let stub = tokio::spawn(async move { axum::serve(listener, app).await });
    // A port nothing listens on: every AWS or host request the function might make at init fails at once.
    let closed = format!("http://127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    let home = bench.scratch.join(format!("lambda-{function}-home"));
    std::fs::create_dir_all(&home)?;
    let env = lambda_env(function, setup, &runtime_api, &closed, &home);
    let log = bench.scratch.join(format!("lambda-{function}-{setup:?}.log"));
    let mut starts = Vec::with_capacity(runs);
    for _ in 0..runs {
        starts.push(cold_start(bin, bench.args.lambda_nice, &env, &log, &mut rx).await?);
    }
    stub.abort();
    Ok(starts)
}

/// One start of `bin` with `env`, timed to the stub's next `next` request on `rx`, then killed.
async fn cold_start(
    bin: &Path,
    nice: i32,
    env: &[(&str, String)],
    log: &Path,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>,
) -> anyhow::Result<ColdStart> {
    let started = Instant::now();
    // Through coreutils' `nice`: the machine's other load must not time-share the start (a Lambda init runs
    // alone in its microVM). nice's own exec (~1 ms) counts against the figure.
    let mut child = Command::new(NICE)
        .arg("-n")
        .arg(nice.to_string())
        .arg(bin)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = started + Duration::from_secs(10);
    let outcome = loop {
        tokio::select! {
            at = rx.recv() => break at.context("the Runtime API stub stopped"),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                if let Some(status) = child.try_wait()? {
                    break Err(anyhow::anyhow!("exited with {status} before asking for an event: {}",
                        std::fs::read_to_string(log).unwrap_or_default().trim()));
                }
                if Instant::now() > deadline {
                    break Err(anyhow::anyhow!("no `next` request within 10 s"));
                }
            }
        }
    };
    let cpu_ms = on_cpu_ms(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let at = outcome?;
    Ok(ColdStart { wall_ms: at.duration_since(started).as_secs_f64() * 1000.0, cpu_ms })
}

/// Deflates a file with python3's zipfile (no zip crate in the workspace); `None` when python3 is missing.
fn zipped_size(path: &Path) -> Option<f64> {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import io,sys,zipfile\nb=io.BytesIO()\nz=zipfile.ZipFile(b,'w',zipfile.ZIP_DEFLATED)\nz.write(sys.argv[1],'bootstrap')\nz.close()\nprint(len(b.getvalue()))")
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse::<f64>().ok().map(|b| b / 1_048_576.0)
}
