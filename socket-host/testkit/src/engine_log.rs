//! The engine's `log` records captured: warnings kept for tests that assert a clean run, every record printed
//! at the level `WA_SIM_TEST_LOG` asks for.

use std::sync::{Mutex, OnceLock};

/// Engine log records at warn level and above, for tests that assert a clean run. The engine logs
/// through the `log` facade; set `WA_SIM_TEST_LOG=debug` to print its records.
pub fn warnings() -> Vec<String> {
    CAPTURE.get().map(|c| c.warnings.lock().unwrap().clone()).unwrap_or_default()
}

struct Capture {
    print: Option<log::LevelFilter>,
    warnings: Mutex<Vec<String>>,
}

static CAPTURE: OnceLock<Capture> = OnceLock::new();

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn || self.print.is_some_and(|p| metadata.level() <= p)
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("[{} {}] {}", record.level(), record.target(), record.args());
        if record.level() <= log::Level::Warn {
            self.warnings.lock().unwrap().push(line.clone());
        }
        if self.print.is_some_and(|p| record.level() <= p) {
            eprintln!("{line}");
        }
    }

    fn flush(&self) {}
}

/// Installs the capture once per test process (later calls do nothing).
pub fn init_logging() {
    let capture = CAPTURE.get_or_init(|| Capture {
        print: std::env::var("WA_SIM_TEST_LOG").ok().and_then(|v| v.parse().ok()),
        warnings: Mutex::new(Vec::new()),
    });
    if log::set_logger(capture).is_ok() {
        log::set_max_level(capture.print.unwrap_or(log::LevelFilter::Warn).max(log::LevelFilter::Warn));
    }
}
