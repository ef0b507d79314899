//! What this machine is and lends: the attributes a node announces and the resources it
//! contributes to the cloud's totals.

use nubo_proto::aggregation::Resources;

/// Attributes detected on this machine, before the operator's own.
pub fn attributes() -> Vec<(String, String)> {
    let mut attributes = vec![
        ("arch".to_string(), std::env::consts::ARCH.to_string()),
        ("os".to_string(), std::env::consts::OS.to_string()),
        ("cpus".to_string(), cpus().to_string()),
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(memory) = meminfo("MemTotal:") {
        attributes.push(("memory_bytes".to_string(), memory.to_string()));
    }
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        attributes.push(("hostname".to_string(), name.trim().to_string()));
    }
    attributes
}

/// The resources this machine lends, as far as it can tell.
pub fn resources() -> Resources {
    let cores = cpus() as f64;
    let memory = meminfo("MemTotal:").unwrap_or(0) as f64;
    let memory_free = meminfo("MemAvailable:").unwrap_or(0) as f64;
    Resources {
        cores,
        memory_bytes: memory,
        disk_bytes: 0.0,
        cores_free: cores,
        memory_free_bytes: memory_free,
        disk_free_bytes: 0.0,
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A line of /proc/meminfo, in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
