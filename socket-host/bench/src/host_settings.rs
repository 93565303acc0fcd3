//! What every host process the bench starts is configured with beyond its section's own settings
//! (`--host-env`, `--host-wrapper`), and the connect governor those hosts run with.

use std::sync::OnceLock;

use socket_host::governor::GovernorConfig;

/// `--host-env`, for every host process.
pub static HOST_ENV: OnceLock<Vec<(String, String)>> = OnceLock::new();
/// `--host-wrapper`, split.
pub static HOST_WRAPPER: OnceLock<Vec<String>> = OnceLock::new();

/// The wrapper command every host runs under, if one was given.
pub fn host_wrapper() -> Option<&'static [String]> {
    HOST_WRAPPER.get().filter(|w| !w.is_empty()).map(Vec::as_slice)
}

/// The governor a host started without governor settings of its section runs with: the defaults, or what
/// `--host-env` sets.
pub fn default_governor() -> GovernorConfig {
    let mut g = GovernorConfig::default();
    for (k, v) in HOST_ENV.get().into_iter().flatten() {
        match k.as_str() {
            "WAKEEPER_CONNECT_RATE" => g.rate_per_sec = v.parse().unwrap_or(g.rate_per_sec),
            "WAKEEPER_CONNECT_BURST" => g.burst = v.parse().unwrap_or(g.burst),
            "WAKEEPER_CONNECT_IN_FLIGHT" => g.max_in_flight = v.parse().unwrap_or(g.max_in_flight),
            _ => {}
        }
    }
    g
}

pub fn governor_label(g: GovernorConfig) -> String {
    format!("{}/s, burst {}, {} in flight", g.rate_per_sec, g.burst, g.max_in_flight)
}

/// The host variables of an unlimited governor (none for the defaults).
pub fn governor_env(unlimited: bool) -> Vec<(&'static str, String)> {
    if unlimited {
        vec![("WAKEEPER_CONNECT_RATE", "0".into()), ("WAKEEPER_CONNECT_IN_FLIGHT", "0".into())]
    } else {
        Vec::new()
    }
}
