//! Two real QUIC endpoints on loopback: delivery, admission, identity binding, bad input.

use std::time::Duration;

use nubo_net::{Admission, Identity, NetEvent, Transport, TransportConfig};
use nubo_proto::membership::MembershipMessage;
use nubo_proto::{Message, NodeId, Peer};
use tokio::sync::mpsc;
use tokio::time::timeout;

fn config() -> TransportConfig {
    TransportConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..TransportConfig::default()
    }
}

fn start(admission: &Admission) -> (Identity, Transport, mpsc::Receiver<NetEvent>) {
    let identity = Identity::generate().unwrap();
    let (tx, rx) = mpsc::channel(64);
    let transport = Transport::bind(&identity, admission.clone(), config(), tx).unwrap();
    (identity, transport, rx)
}

fn ping() -> Message {
    Message::Membership(MembershipMessage::Ping)
}

async fn next_message(rx: &mut mpsc::Receiver<NetEvent>) -> Option<(Peer, Message)> {
    loop {
        match timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(NetEvent::Message { from, message })) => return Some((from, message)),
            Ok(Some(NetEvent::PeerDown(_))) => continue,
            _ => return None,
        }
    }
}

async fn next_down(rx: &mut mpsc::Receiver<NetEvent>) -> Option<NodeId> {
    loop {
        match timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(NetEvent::PeerDown(id))) => return Some(id),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

#[tokio::test]
async fn admitted_peers_exchange_messages_both_ways_on_one_connection() {
    let admission = Admission::generate([0; 32]).unwrap();
    let (a_id, a, mut a_rx) = start(&admission);
    let (b_id, b, mut b_rx) = start(&admission);
    a.send(Peer::with_addr(b_id.node_id(), b.local_addr()), &ping());
    let (from, message) = next_message(&mut b_rx).await.expect("b hears a");
    assert_eq!(from.id, a_id.node_id());
    assert_eq!(from.addr, Some(a.local_addr()));
    assert_eq!(message, ping());
    // b answers without knowing a's address from anywhere but the connection.
    b.send(from, &ping());
    let (from, _) = next_message(&mut a_rx).await.expect("a hears b");
    assert_eq!(from.id, b_id.node_id());
    assert_eq!(a.counters().dials_failed, 0);
}

#[tokio::test]
async fn a_node_of_another_cloud_is_refused_and_nothing_it_sends_arrives() {
    let cloud = Admission::generate([0; 32]).unwrap();
    let (_, member, mut member_rx) = start(&cloud);
    let (_, stranger, mut stranger_rx) = start(&Admission::generate([0; 32]).unwrap());
    // Whatever id the stranger dials the member under, the member refuses it.
    let target = Peer::with_addr(NodeId(1), member.local_addr());
    stranger.send(target, &ping());
    assert!(next_down(&mut stranger_rx).await.is_some());
    assert!(
        timeout(Duration::from_millis(500), member_rx.recv())
            .await
            .is_err(),
        "the member hears nothing"
    );
    assert!(member.counters().handshakes_refused + member.counters().handshakes_failed >= 1);
}

#[tokio::test]
async fn dialing_an_address_that_answers_with_another_identity_fails() {
    let cloud = Admission::generate([0; 32]).unwrap();
    let (_, a, mut a_rx) = start(&cloud);
    let (_, b, _b_rx) = start(&cloud);
    // a believes some other node lives at b's address.
    a.send(Peer::with_addr(NodeId(42), b.local_addr()), &ping());
    assert_eq!(next_down(&mut a_rx).await, Some(NodeId(42)));
    assert!(a.counters().handshakes_refused >= 1);
}

#[tokio::test]
async fn garbage_datagrams_leave_the_endpoint_working() {
    let cloud = Admission::generate([0; 32]).unwrap();
    let (_, a, _a_rx) = start(&cloud);
    let (b_id, b, mut b_rx) = start(&cloud);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut noise = 0x1234_5678_u64;
    for size in [1usize, 20, 1200, 1500, 65_000] {
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                noise ^= noise << 13;
                noise ^= noise >> 7;
                noise ^= noise << 17;
                noise as u8
            })
            .collect();
        let _ = socket.send_to(&bytes, b.local_addr());
    }
    a.send(Peer::with_addr(b_id.node_id(), b.local_addr()), &ping());
    assert!(next_message(&mut b_rx).await.is_some());
}

#[tokio::test]
async fn an_unreachable_peer_is_reported_down() {
    let cloud = Admission::generate([0; 32]).unwrap();
    let (_, a, mut a_rx) = start(&cloud);
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    a.send(Peer::with_addr(NodeId(7), addr), &ping());
    assert_eq!(next_down(&mut a_rx).await, Some(NodeId(7)));
}
