//! Operating a service on real agents: rolling updates that never leave the service without
//! an answering instance, automatic reverts of broken versions, rollback, history, drains, a
//! suite that survives `kill -9` of every agent, and deploys that say why they cannot be
//! placed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Agent, Cloud, NUBO, ONE_CLOUD_AT_A_TIME, api_at, json_at, nubo, wait_until, write};
use serde_json::Value;

/// A static site served by python3 from an artifact, checked over HTTP.
fn site(artifact: &str, extra: &str) -> String {
    format!(
        r#"name = "site"
namespace = "web"

[run]
command = "python3"
args = ["-m", "http.server", "${{NUBO_PORT_HTTP}}", "--bind", "127.0.0.1"]
artifact = "{artifact}"

[resources]
cpu = 0.05
memory = "128MiB"

[placement]
replicas = 3

[ports]
http = 0

[health]
type = "http"
port = "http"
interval = "300ms"
grace = "300ms"

[update]
min_healthy_time = "1s"
healthy_deadline = "20s"
{extra}
"#
    )
}

/// Uploads a directory holding `index.html` with `page` as a blob (`tar` or `tar.gz`).
fn bundle(agent: &Agent, work: &Path, name: &str, page: &str, gzip: bool) -> String {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), page).unwrap();
    let archive = work.join(format!("{name}.tar{}", if gzip { ".gz" } else { "" }));
    let status = Command::new("tar")
        .arg(if gzip { "-czf" } else { "-cf" })
        .arg(&archive)
        .arg("-C")
        .arg(&dir)
        .arg("index.html")
        .status()
        .unwrap();
    assert!(status.success());
    let stored: Value = agent.json(&["blob", "put", archive.to_str().unwrap()]);
    stored["id"].as_str().unwrap().to_string()
}

/// The agent's metrics, parsed: every sample by name and labels. Panics on a line that is
/// not text exposition.
fn scrape(agent: &Agent) -> std::collections::BTreeMap<String, f64> {
    let (status, text) = api_at(&agent.dir, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ")
                    || comment.starts_with("TYPE ")
                    || comment.starts_with("UNIT ")
                    || comment == "EOF",
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.starts_with("nubo_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line}");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

/// The samples of every agent, added up.
fn scrape_all(agents: &[Agent]) -> std::collections::BTreeMap<String, f64> {
    let mut total = std::collections::BTreeMap::new();
    for agent in agents {
        for (series, value) in scrape(agent) {
            *total.entry(series).or_insert(0.0) += value;
        }
    }
    total
}

fn api_at_without_token(dir: &Path, path: &str) -> (u16, String) {
    let addr = std::fs::read_to_string(dir.join("api.addr")).unwrap();
    match ureq::get(&format!("http://{}{path}", addr.trim())).call() {
        Ok(response) => (response.status(), String::new()),
        Err(ureq::Error::Status(code, _)) => (code, String::new()),
        Err(error) => (0, error.to_string()),
    }
}

fn instances(agent: &Agent, service: &str) -> Vec<Value> {
    instances_at(&agent.dir, service)
}

fn instances_at(dir: &Path, service: &str) -> Vec<Value> {
    json_at::<Vec<Value>>(dir, &["ps", service]).unwrap_or_default()
}

/// The page an address serves, if it answers.
fn page(port: u16) -> Option<String> {
    fetch(port).ok()
}

/// The page an address serves, or why not.
fn fetch(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(700)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if answer.starts_with("HTTP/1.0 200") {
        Ok(answer.rsplit("\r\n\r\n").next().unwrap_or("").to_string())
    } else {
        Err(answer.lines().next().unwrap_or("empty answer").to_string())
    }
}

/// A client that, every 100 ms, asks every address the service was ever seen at and counts
/// the rounds in which none answered.
struct Poller {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    dark: Arc<AtomicU64>,
    pages: Arc<Mutex<BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(agent: &Agent) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let ports: Arc<Mutex<BTreeSet<u16>>> = Arc::default();
        let rounds = Arc::new(AtomicU64::new(0));
        let dark = Arc::new(AtomicU64::new(0));
        let pages: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let watch = {
            let (stop, ports, dir) = (stop.clone(), ports.clone(), agent.dir.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for i in instances_at(&dir, "web/site") {
                        if let Some(port) = i["ports"]["http"].as_u64() {
                            ports.lock().unwrap().insert(port as u16);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(150));
                }
            })
        };
        let ask = {
            let (stop, rounds, dark, pages) =
                (stop.clone(), rounds.clone(), dark.clone(), pages.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let known: Vec<u16> = ports.lock().unwrap().iter().copied().collect();
                    if !known.is_empty() {
                        let results: Vec<(u16, Result<String, String>)> =
                            known.iter().map(|p| (*p, fetch(*p))).collect();
                        let answers: Vec<String> =
                            results.iter().filter_map(|(_, r)| r.clone().ok()).collect();
                        rounds.fetch_add(1, Ordering::SeqCst);
                        if answers.is_empty() {
                            dark.fetch_add(1, Ordering::SeqCst);
                            eprintln!("no instance answered: {results:?}");
                        }
                        pages.lock().unwrap().extend(answers);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Poller {
            stop,
            rounds,
            dark,
            pages,
            threads: vec![watch, ask],
        }
    }

    /// Rounds asked, rounds with no answer, and the pages seen since the last call.
    fn take(&self) -> (u64, u64, BTreeSet<String>) {
        (
            self.rounds.swap(0, Ordering::SeqCst),
            self.dark.swap(0, Ordering::SeqCst),
            std::mem::take(&mut *self.pages.lock().unwrap()),
        )
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Every replica of web/site runs `version` and serves `expected`.
fn every_replica_serves(agent: &Agent, version: u64, expected: &str) -> bool {
    let list = instances(agent, "web/site");
    list.len() == 3
        && list.iter().all(|i| {
            i["version"].as_u64() == Some(version)
                && i["ports"]["http"]
                    .as_u64()
                    .and_then(|p| page(p as u16))
                    .is_some_and(|body| body.contains(expected))
        })
}

/// The version a deploy or rollback published: "… version N; waiting …".
fn deployed_version(stderr: &str) -> u64 {
    stderr
        .split("; waiting")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {stderr}"))
}

#[test]
fn rolling_updates_reverts_rollback_drain_and_a_full_restart() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cloud = Cloud::converged(4, |i| vec!["--attr".into(), format!("rack=r{i}")]);
    let work = cloud.root.path().to_path_buf();
    let admin = &cloud.agents[0];
    let v1_blob = bundle(admin, &work, "v1", "<h1>v1</h1>", false);
    let v2_blob = bundle(admin, &work, "v2", "<h1>v2</h1>", true);

    // v1, deployed and waited for: the command returns once all three are ready.
    let file = write(&work, "site.toml", &site(&v1_blob, ""));
    let started = Instant::now();
    let (ok, out, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{out}\n{err}\n{}", cloud.logs());
    let v1 = deployed_version(&err);
    assert!(
        out.contains("web/site") && out.contains("http=127.0.0.1:"),
        "{out}"
    );
    assert!(
        every_replica_serves(admin, v1, "v1"),
        "{:?}",
        instances(admin, "web/site")
    );
    eprintln!(
        "v1 ready everywhere {:?} after the deploy",
        started.elapsed()
    );

    // Events, followed through another agent than the one deploying.
    let events_file = work.join("events.jsonl");
    let mut events = Command::new(NUBO)
        .args([
            "events",
            "--follow",
            "--service",
            "web/site",
            "--json",
            "--data-dir",
        ])
        .arg(&cloud.agents[1].dir)
        .stdout(std::fs::File::create(&events_file).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics_before = scrape_all(&cloud.agents);

    // (a) v1 -> v2 while a client polls every 100 ms: never a round without an answer.
    let poller = Poller::start(admin);
    std::thread::sleep(Duration::from_secs(1));
    let file = write(&work, "site.toml", &site(&v2_blob, ""));
    let started = Instant::now();
    let (ok, out, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{out}\n{err}\n{}", cloud.logs());
    let v2 = deployed_version(&err);
    assert!(err.contains("rolling, batch 2 of 3"), "{err}");
    eprintln!("v1 -> v2 rolled in {:?}", started.elapsed());
    assert!(
        every_replica_serves(admin, v2, "v2"),
        "{:?}",
        instances(admin, "web/site")
    );
    let (rounds, dark, pages) = poller.take();
    assert!(rounds > 20, "{rounds} rounds");
    assert_eq!(dark, 0, "rounds with no instance answering, of {rounds}");
    assert!(pages.iter().any(|p| p.contains("v1")) && pages.iter().any(|p| p.contains("v2")));

    // The identical file again (the operator does it twice): a new version, nothing restarts.
    let addresses = |list: Vec<Value>| -> BTreeSet<String> {
        list.iter()
            .map(|i| format!("{}:{}", i["node"], i["ports"]["http"]))
            .collect()
    };
    let before = addresses(instances(admin, "web/site"));
    let (ok, _, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{err}");
    let again = deployed_version(&err);
    assert!(every_replica_serves(admin, again, "v2"));
    assert_eq!(
        addresses(instances(admin, "web/site")),
        before,
        "no instance was replaced"
    );

    // (b) A broken v3 that exits at once, then one that never becomes healthy: each fails,
    // reverts to v2 everywhere, and v2 answers throughout.
    let exits = site(&v2_blob, "").replace(
        "args = [\"-m\", \"http.server\"",
        "args = [\"-c\", \"import sys; sys.exit(3)\", \"http.server\"",
    ) + "\n[restart]\nattempts = 1\ndelay = \"200ms\"\n";
    let never = site(&v2_blob, "")
        .replace(
            "args = [\"-m\", \"http.server\", \"${NUBO_PORT_HTTP}\"",
            "args = [\"-m\", \"http.server\", \"1\"",
        )
        .replace("healthy_deadline = \"20s\"", "healthy_deadline = \"4s\"");
    for (name, text) in [("exits.toml", exits), ("never.toml", never)] {
        let file = write(&work, name, &text);
        let started = Instant::now();
        let (ok, out, err) = nubo(admin, &["deploy", &file]);
        assert!(
            !ok,
            "{name}: a broken version must not succeed\n{out}\n{err}"
        );
        assert!(err.contains("reverted to version"), "{name}: {err}");
        assert!(
            wait_until(Duration::from_secs(30), || every_replica_serves(
                admin, again, "v2"
            ))
            .is_some(),
            "{name}: {:?}\n{}",
            instances(admin, "web/site"),
            cloud.logs()
        );
        eprintln!("{name} failed and reverted in {:?}", started.elapsed());
        let (rounds, dark, pages) = poller.take();
        assert_eq!(
            dark, 0,
            "{name}: rounds with no instance answering, of {rounds}"
        );
        assert!(pages.iter().all(|p| p.contains("v2")), "{name}: {pages:?}");
    }
    poller.stop();
    let _ = events.kill();
    let _ = events.wait();
    let seen: Vec<String> = std::fs::read_to_string(&events_file)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    let steps = |version: u64, expected: &[&str]| {
        let mut at = 0;
        for step in expected {
            let step = step.replace("V", &version.to_string());
            match seen[at..].iter().position(|m| m.contains(&step)) {
                Some(i) => at += i + 1,
                None => panic!("no {step:?} after event {at} in {seen:#?}"),
            }
        }
    };
    steps(
        v2,
        &[
            "version V deployed",
            "update to version V: batch 1 of 3",
            "instance of version V ready",
            "update to version V: batch 2 of 3",
            "update to version V: batch 3 of 3",
            "version V complete",
        ],
    );
    let v3 = seen
        .iter()
        .filter_map(|m| {
            m.strip_prefix("version ")?
                .strip_suffix(" failed")?
                .parse::<u64>()
                .ok()
        })
        .next();
    let failed_version = seen
        .iter()
        .find_map(|m| {
            let rest = m.strip_prefix("version ")?;
            let (v, tail) = rest.split_once(' ')?;
            tail.starts_with("failed on")
                .then(|| v.parse::<u64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no failure among {seen:#?} ({v3:?})"));
    steps(
        failed_version,
        &[
            "version V deployed",
            "update to version V: batch 1 of 3",
            "instance of version V",
            "version V failed on",
        ],
    );
    assert!(
        seen.iter()
            .any(|m| m == &format!("reverting to version {again}")),
        "{seen:#?}"
    );

    // Metrics parse as text exposition, and their counters moved with the cloud.
    let metrics_after = scrape_all(&cloud.agents);
    for name in [
        "nubo_suite_taken_total",
        "nubo_health_probes_total{result=\"ok\"}",
    ] {
        assert!(
            metrics_after[name] > metrics_before[name],
            "{name}: {} then {}",
            metrics_before[name],
            metrics_after[name]
        );
    }
    assert_eq!(
        metrics_after["nubo_members{state=\"alive\"}"], 16.0,
        "4 agents see 4 alive"
    );
    let (status, _) = api_at_without_token(&admin.dir, "/metrics");
    assert_eq!(
        status, 401,
        "metrics need the token unless --metrics-public"
    );

    // Logs of every instance, streamed from their nodes: the probes' requests, no tracebacks.
    let mut follow = Command::new(NUBO)
        .args(["logs", "web/site", "--follow", "--tail", "3", "--data-dir"])
        .arg(&cloud.agents[3].dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = follow.kill();
    let output = follow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let speakers: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.contains("\"GET / HTTP/1.0\" 200"))
        .filter_map(|l| l.split(" | ").next())
        .collect();
    assert!(
        speakers.len() >= 3,
        "{speakers:?}\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !text.contains("Traceback") && !text.contains("BrokenPipe"),
        "{text}"
    );

    let history: Vec<Value> = admin.json(&["history", "web/site"]);
    let outcomes: Vec<&str> = history
        .iter()
        .map(|h| h["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec!["replaced", "replaced", "running", "reverted", "reverted"],
        "{history:?}"
    );
    assert!(
        history[1]["changes"].to_string().contains("artifact"),
        "{history:?}"
    );
    assert_eq!(history[2]["changes"], serde_json::json!([]), "{history:?}");

    // (c) Rollback to v1's description, as a new version.
    let (ok, out, err) = nubo(admin, &["rollback", "web/site", "--to", &v1.to_string()]);
    assert!(ok, "{out}\n{err}");
    let v4 = deployed_version(&err);
    assert!(v4 > v2);
    assert!(
        every_replica_serves(admin, v4, "v1"),
        "{:?}",
        instances(admin, "web/site")
    );

    // (e) Drain a node that runs an instance: it empties with an answer at every moment, and
    // takes no new instance.
    let poller = Poller::start(admin);
    let hosts: BTreeSet<String> = instances(admin, "web/site")
        .iter()
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect();
    let drained = hosts.iter().next().unwrap().clone();
    let (ok, out, err) = nubo(admin, &["drain", &drained, "--wait", "60s"]);
    assert!(ok, "{out}\n{err}\n{}", cloud.logs());
    let after: Vec<Value> = instances(admin, "web/site");
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        after.iter().all(|i| i["node"] != drained.as_str()),
        "{after:?}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || every_replica_serves(
            admin, v4, "v1"
        ))
        .is_some()
    );
    let (rounds, dark, _) = poller.take();
    poller.stop();
    assert_eq!(
        dark, 0,
        "drain: rounds with no instance answering, of {rounds}"
    );
    let (ok, _, err) = nubo(admin, &["drain", &drained, "--undo"]);
    assert!(ok, "{err}");

    // (f) A service no node can take: the deploy says which constraint filtered how many.
    let mars = site(&v1_blob, "")
        .replace("name = \"site\"", "name = \"mars\"")
        .replace(
            "replicas = 3",
            "replicas = 2\nconstraints = ['region == \"mars\"']",
        );
    let file = write(&work, "mars.toml", &mars);
    let (ok, _, err) = nubo(admin, &["deploy", &file, "--wait", "20s"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("constraint region == \"mars\" filtered 4 of 4 nodes"),
        "{err}"
    );
    let services: Vec<Value> = admin.json(&["services"]);
    let mars = services.iter().find(|s| s["key"] == "web/mars").unwrap();
    assert!(
        mars["reasons"].to_string().contains("filtered 4 of 4"),
        "{mars}"
    );

    // (d) A removed service, then every agent and every instance killed at once (the
    // machines die); started again, the cloud runs web/site at its last version, and the
    // removed service stays removed.
    let gone = site(&v1_blob, "").replace("name = \"site\"", "name = \"gone\"");
    let file = write(&work, "gone.toml", &gone);
    let (ok, _, err) = nubo(admin, &["deploy", &file, "--detach"]);
    assert!(ok, "{err}");
    let gone_version: u64 = admin.json::<Value>(&["history", "web/gone"])[0]["version"]
        .as_u64()
        .unwrap();
    let (ok, _, err) = nubo(admin, &["rm", "web/gone"]);
    assert!(ok, "{err}");
    assert!(
        wait_until(Duration::from_secs(30), || instances(admin, "web/gone")
            .is_empty())
        .is_some()
    );
    for agent in &mut cloud.agents {
        agent.kill_host();
    }
    let restarted = Instant::now();
    for agent in &mut cloud.agents {
        agent.restart();
    }
    let admin = &cloud.agents[0];
    let back = wait_until(Duration::from_secs(90), || {
        every_replica_serves(admin, v4, "v1")
    });
    assert!(
        back.is_some(),
        "{:?}\n{:?}\n{}",
        instances(admin, "web/site"),
        admin.try_json::<Value>(&["services"]),
        cloud.logs()
    );
    eprintln!(
        "every service back {:?} after restarting every agent",
        restarted.elapsed()
    );
    let services: Vec<Value> = admin.json(&["services"]);
    assert!(
        services.iter().all(|s| s["key"] != "web/gone"),
        "{services:?}"
    );
    assert!(instances(admin, "web/gone").is_empty());
    // A replay of its older document (signed then, sent again now) is refused.
    let admin_key = nubo_net::Identity::from_secret(
        &std::fs::read(cloud.root.path().join("admin.key")).unwrap(),
    )
    .unwrap();
    let replay = nubo_agent::authority::SignedDocument::sign(
        &admin_key,
        nubo_agent::authority::Document {
            key: "web/gone".into(),
            version: gone_version,
            intent: nubo_agent::authority::Intent::Run,
            description: gone.clone(),
            signer: admin_key.public_key(),
            grant: None,
        },
    );
    let bytes = postcard::to_allocvec(&replay).unwrap();
    let (status, answer) = api_at(&admin.dir, "POST", "/v1/services", Some(&bytes));
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("not newer"), "{answer}");
    assert!(instances(admin, "web/gone").is_empty());
}
