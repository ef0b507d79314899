//! Real agents facing bad input: a node of another cloud, a forged credential, garbage
//! datagrams, garbage on the API port, and malformed and oversized frames from an admitted
//! peer. The agent refuses, counts, logs, and keeps answering.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Agent, Cloud, ONE_CLOUD_AT_A_TIME, wait_until};
use nubo_net::tls::{PeerVerifier, client_config, server_name};
use nubo_net::{Admission, Identity, JoinToken};
use nubo_proto::NodeId;
use quinn::crypto::rustls::QuicClientConfig;
use serde_json::Value;

fn token_of(agent: &Agent) -> JoinToken {
    JoinToken::decode(&agent.invite(), 0).unwrap()
}

fn address(agent: &Agent) -> (NodeId, SocketAddr) {
    let status = agent.status();
    (
        status["node_id"].as_str().unwrap().parse().unwrap(),
        status["listen"].as_str().unwrap().parse().unwrap(),
    )
}

fn net_counter(agent: &Agent, name: &str) -> u64 {
    agent.status()["net"][name].as_u64().unwrap()
}

/// A raw QUIC connection to `to`, presenting `proof` for a fresh key.
async fn raw_connection(
    admission: &Admission,
    proof: Option<[u8; 32]>,
    to: (NodeId, SocketAddr),
) -> Result<quinn::Connection, String> {
    let identity = Identity::generate().unwrap();
    let proof = proof.unwrap_or_else(|| admission.proof(&identity.public_key()));
    let tls = client_config(
        &identity,
        &proof,
        PeerVerifier::for_cloud(admission.clone()),
    )
    .map_err(|e| e.to_string())?;
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(to.1, &server_name(to.0))
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[test]
fn nodes_without_a_valid_credential_are_refused_and_logged() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cloud = Cloud::start(2);
    assert!(
        wait_until(Duration::from_secs(30), || cloud.agents[1].members_alive()
            == 2)
        .is_some(),
        "{}",
        cloud.logs()
    );
    let real = token_of(&cloud.agents[0]);

    // A node holding another cloud's secret, pointed at our members.
    let forged = JoinToken {
        admission: Admission::generate([0; 32]).unwrap(),
        ..real.clone()
    };
    let intruder = Agent::start(&cloud.root.path().join("intruder"), Some(&forged.encode()));
    assert!(
        wait_until(Duration::from_secs(30), || intruder
            .log()
            .contains("refused"))
        .is_some(),
        "the intruder was not refused:\n{}",
        intruder.log()
    );
    // Time for a wrongly admitted intruder to show up anywhere.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(intruder.members_alive(), 1, "the intruder joined nobody");
    for agent in &cloud.agents {
        assert_eq!(agent.members_alive(), 2, "no member saw the intruder");
    }

    // A key whose proof was made for another key (a stolen certificate extension): the
    // member refuses it in the handshake and says so in its log.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let member = address(&cloud.agents[0]);
    let stolen = real
        .admission
        .proof(&Identity::generate().unwrap().public_key());
    let refused_before = net_counter(&cloud.agents[0], "handshakes_refused");
    let result = runtime.block_on(raw_connection(&real.admission, Some(stolen), member));
    assert!(
        result.is_err()
            || runtime.block_on(async {
                // TLS 1.3 may finish the client's side before the server's verdict arrives.
                let connection = result.unwrap();
                connection.closed().await;
                true
            })
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            net_counter(&cloud.agents[0], "handshakes_refused") > refused_before
        })
        .is_some()
    );
    assert!(
        cloud.agents[0]
            .log()
            .contains("refused a peer's credential")
    );
    // And with the right proof, the same kind of connection is accepted.
    assert!(
        runtime
            .block_on(raw_connection(&real.admission, None, member))
            .is_ok()
    );
}

#[test]
fn garbage_datagrams_api_bytes_and_bad_frames_leave_the_agent_answering() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cloud = Cloud::start(2);
    let agent = &cloud.agents[0];
    let (id, addr) = address(agent);
    let admission = token_of(agent).admission;

    // Random datagrams on the QUIC port.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut noise = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                noise ^= noise << 13;
                noise ^= noise >> 7;
                noise ^= noise << 17;
                noise as u8
            })
            .collect()
    };
    for size in [0, 1, 7, 100, 1200, 1350, 9000, 60_000] {
        let _ = socket.send_to(&random(size), addr);
    }
    // Random bytes and a bogus request on the API port.
    let api: SocketAddr = std::fs::read_to_string(agent.dir.join("api.addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for bytes in [
        random(5000),
        b"GET /v1/status HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
    ] {
        if let Ok(mut stream) = std::net::TcpStream::connect(api) {
            let _ = stream.write_all(&bytes);
        }
    }
    // An unauthorised API call is refused with a hint.
    let unauthorised = std::process::Command::new(common::NUBO)
        .args(["status", "--api", &api.to_string(), "--token", "wrong"])
        .output()
        .unwrap();
    assert!(!unauthorised.status.success());
    assert!(String::from_utf8_lossy(&unauthorised.stderr).contains("API token"));

    // From an admitted peer: a frame of garbage, then an oversized frame.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let connection = raw_connection(&admission, None, (id, addr)).await.unwrap();
        let mut stream = connection.open_uni().await.unwrap();
        let garbage = random(300);
        stream
            .write_all(&(garbage.len() as u32).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&garbage).await.unwrap();
        stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let _ = stream.finish();
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        assert!(
            closed.is_ok(),
            "the agent closes a connection that breaks framing"
        );
    });
    assert!(net_counter(agent, "frames_malformed") >= 1);
    assert!(net_counter(agent, "frames_oversized") >= 1);

    // Still a working member.
    let status: Value = agent.status();
    assert!(status["uptime_secs"].as_u64().is_some());
    assert!(
        wait_until(Duration::from_secs(30), || cloud.agents[1].members_alive()
            == 2)
        .is_some()
    );
    agent.put("after-garbage", "fine").unwrap();
    assert_eq!(cloud.agents[1].get("after-garbage").as_deref(), Ok("fine"));
}

#[test]
fn the_api_answers_under_a_flood_of_half_open_connections_and_refuses_absurd_numbers() {
    use std::os::unix::fs::PermissionsExt;
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cloud = Cloud::start(1);
    let agent = &cloud.agents[0];
    // The data directory and what holds secrets are the owner's alone.
    let mode = |name: &str| {
        std::fs::metadata(agent.dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for file in ["state.redb", "node.key", "api.token"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
    // The administrator's key is not among them: `nubo init` put it elsewhere.
    assert!(!agent.dir.join("admin.key").exists());
    let key = agent.dir.parent().unwrap().join("admin.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // 2,000 connections that never finish their request head.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let api: SocketAddr = std::fs::read_to_string(agent.dir.join("api.addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2_000 {
        match std::net::TcpStream::connect(api) {
            Ok(mut stream) => {
                let _ = stream.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n");
                held.push(stream);
            }
            Err(error) => panic!("connection {} refused: {error}", held.len()),
        }
    }
    let started = std::time::Instant::now();
    let status = agent.status();
    assert!(status["uptime_secs"].as_u64().is_some());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} with 2,000 held"
    );
    drop(held);

    // Absurd numbers in every query parameter, and garbage where ids go: refused with a 4xx,
    // never a crash.
    let huge = "18446744073709551616";
    for (method, path) in [
        ("POST", format!("/v1/invite?ttl_secs={}", u64::MAX)),
        ("POST", format!("/v1/invite?ttl_secs={huge}")),
        ("POST", "/v1/invite?ttl_secs=-1".to_string()),
        ("GET", format!("/v1/logs/web/site?tail={huge}")),
        ("GET", format!("/v1/logs/web/site?since_secs={}", u64::MAX)),
        ("GET", "/v1/logs/web/site?follow=sometimes".to_string()),
        ("GET", format!("/v1/events?limit={}", u64::MAX)),
        ("GET", "/v1/events?after=-5".to_string()),
        ("GET", format!("/v1/events?after={huge}")),
        ("POST", "/v1/drain?undo=maybe".to_string()),
        ("GET", "/v1/blobs/not-a-blob-id".to_string()),
        ("GET", format!("/v1/blobs/{}", "f".repeat(64))),
        ("GET", "/v1/history/%00%1b[31m".to_string()),
        ("GET", "/v1/services/..%2F..%2Fetc".to_string()),
        ("GET", format!("/v1/kv/{}", "k".repeat(100_000))),
        ("DELETE", "/v1/kv/".to_string()),
        ("GET", "/v1/kv-local/%ff%fe".to_string()),
        ("GET", "/v1/ps?x=1".to_string()),
    ] {
        let (code, answer) = common::api_at(&agent.dir, method, &path, None);
        assert!(
            (400..500).contains(&code) || code == 200 || code == 503,
            "{method} {}: {code} {answer}",
            &path[..path.len().min(80)]
        );
    }
    for body in [&b"garbage"[..], &[0xff; 70_000][..]] {
        let (code, answer) = common::api_at(&agent.dir, "POST", "/v1/services", Some(body));
        assert!((400..500).contains(&code), "{code} {answer}");
    }
    let status: Value = agent.status();
    assert!(status["uptime_secs"].as_u64().is_some(), "still answering");
}
