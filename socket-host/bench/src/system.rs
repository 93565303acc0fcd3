//! What the bench reads from the operating system: a process's RSS and CPU time, a free port, random names,
//! and the one line describing the machine a table was measured on.

use std::process::Command;

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
    });
    // The kernel reports in USER_HZ, 100 on every Linux this runs on.
    ticks.map_or(0.0, |t| t as f64 / 100.0)
}

/// On-CPU time of every live thread of a process, from `/proc/<pid>/task/*/schedstat` (nanoseconds).
pub fn on_cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ns as f64 / 1e6
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).expect("the OS random source works");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Date, CPUs, memory and load average at the start, for the line above the table.
pub fn machine() -> String {
    let sh = |c: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_default()
    };
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").trim().to_owned();
    let nproc = sh("nproc").trim().to_owned();
    let mem = sh("free -h | awk '/^Mem:/ {print $2}'").trim().to_owned();
    let load = sh("cut -d' ' -f1-3 /proc/loadavg").trim().to_owned();
    let date = sh("date -u '+%Y-%m-%d %H:%M UTC'").trim().to_owned();
    format!("{date}; {nproc} CPUs ({cpu}), {mem} RAM; load average at start {load}")
}
