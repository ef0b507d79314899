//! The decoder answers every input with `Ok` or `Err`, never a panic, and round-trips every
//! message the core can produce.

use bytes::Bytes;
use nubo_proto::broadcast::{
    Announcement, BroadcastMessage, BucketDigest, DIGEST_BUCKETS, Epoch, Gossip, IDS_MAX,
    MessageId, TreeMessage,
};
use nubo_proto::kv::{Bucket, KvMessage, Record, StoreError, Version};
use nubo_proto::membership::{MembershipMessage, Priority, SHUFFLE_PEERS_MAX, SHUFFLE_ROUTE_MAX};
use nubo_proto::ring::{RingMessage, ViewEntry};
use nubo_proto::suite::{SuiteEntry, SuiteMessage};
use nubo_proto::wire::{self, DecodeError, MESSAGE_BYTES_MAX, Message, PROTOCOL_VERSION};
use nubo_proto::{NodeId, Peer, Rng, Time};

fn id(n: u64) -> MessageId {
    MessageId {
        origin: NodeId(u128::from(n) << 64 | 0xabc),
        seq: n,
    }
}

fn gossip(n: u64) -> Gossip {
    Gossip {
        id: id(n),
        born: Time::from_millis(n),
        hops: 3,
        payload: Bytes::from(vec![n as u8; 40]),
    }
}

/// One message of every kind.
fn samples() -> Vec<Message> {
    let a = Peer::with_addr(NodeId(1), "192.0.2.1:7400".parse().unwrap());
    let b = Peer::with_addr(NodeId(u128::MAX), "[2001:db8::1]:7400".parse().unwrap());
    let c = Peer::new(NodeId(3));
    vec![
        Message::Membership(MembershipMessage::Join),
        Message::Membership(MembershipMessage::ForwardJoin { joiner: a, ttl: 6 }),
        Message::Membership(MembershipMessage::Neighbor {
            priority: Priority::High,
        }),
        Message::Membership(MembershipMessage::NeighborReply { accepted: false }),
        Message::Membership(MembershipMessage::Disconnect { leaving: true }),
        Message::Membership(MembershipMessage::Shuffle {
            origin: b,
            ttl: 2,
            peers: vec![a, b, c],
            route: vec![a.id],
        }),
        Message::Membership(MembershipMessage::ShuffleReply {
            peers: vec![c],
            route: vec![b.id],
        }),
        Message::Membership(MembershipMessage::Ping),
        Message::Membership(MembershipMessage::Pong),
        Message::Broadcast(BroadcastMessage::Gossip(gossip(7))),
        Message::Broadcast(BroadcastMessage::IHave(vec![Announcement {
            id: id(1),
            hops: 2,
        }])),
        Message::Broadcast(BroadcastMessage::Graft(vec![id(1), id(2)])),
        Message::Broadcast(BroadcastMessage::Tree(TreeMessage::Beacon {
            epoch: Epoch {
                number: 7,
                root: NodeId(5),
            },
            hops: 3,
        })),
        Message::Broadcast(BroadcastMessage::Tree(TreeMessage::Adopt {
            epoch: Epoch {
                number: 7,
                root: NodeId(5),
            },
            adopt: true,
            seq: 99,
        })),
        Message::Broadcast(BroadcastMessage::Digest {
            from: Time::from_millis(1),
            to: Time::from_millis(2),
            buckets: vec![BucketDigest { count: 3, hash: 99 }; DIGEST_BUCKETS],
        }),
        Message::Broadcast(BroadcastMessage::Ids(vec![id(4)])),
        Message::Broadcast(BroadcastMessage::Want(vec![id(5)])),
        Message::Broadcast(BroadcastMessage::Repair(vec![gossip(1), gossip(2)])),
        Message::Broadcast(BroadcastMessage::Summary {
            from: Time::from_millis(1),
            to: Time::from_millis(2),
            all: BucketDigest { count: 3, hash: 99 },
        }),
        Message::Broadcast(BroadcastMessage::Differs {
            from: Time::from_millis(1),
            to: Time::from_millis(2),
        }),
        Message::Ring(RingMessage::View {
            entries: vec![
                ViewEntry { peer: a, age_ms: 0 },
                ViewEntry { peer: b, age_ms: 9 },
            ],
            answer: true,
        }),
        Message::Ring(RingMessage::Lookup {
            id: 5,
            origin: a,
            key: u128::MAX - 3,
            hops: 2,
        }),
        Message::Ring(RingMessage::Found {
            id: 5,
            key: 77,
            replicas: vec![ViewEntry { peer: c, age_ms: 1 }],
            hops: 4,
        }),
        Message::Kv(KvMessage::Put {
            op: 1,
            record: record(),
        }),
        Message::Kv(KvMessage::PutAck {
            op: 1,
            result: Err(StoreError::Full { budget: 1 << 30 }),
        }),
        Message::Kv(KvMessage::Get {
            op: 2,
            key: Bytes::from_static(b"key"),
        }),
        Message::Kv(KvMessage::GetReply {
            op: 2,
            record: Some(Record {
                value: None,
                ..record()
            }),
        }),
        Message::Kv(KvMessage::Digest {
            lo: 1,
            hi: 0,
            buckets: vec![Bucket { count: 3, sum: 99 }; 4],
        }),
        Message::Kv(KvMessage::Keys {
            lo: 1,
            hi: 0,
            count: 4,
            covered: vec![0, 3],
            entries: vec![(Bytes::from_static(b"key"), record().version)],
        }),
        Message::Kv(KvMessage::Want(vec![Bytes::from_static(b"key")])),
        Message::Kv(KvMessage::Records {
            records: vec![record(), record()],
            handoff: true,
        }),
        Message::Kv(KvMessage::Stored(vec![(
            Bytes::from_static(b"key"),
            record().version,
        )])),
        Message::Suite(SuiteMessage::Digest {
            count: 2,
            sum: 99,
            provisional: true,
        }),
        Message::Suite(SuiteMessage::Versions {
            from: "web/".into(),
            to: Some("x".into()),
            list: vec![("web/site".into(), 7, 42)],
        }),
        Message::Suite(SuiteMessage::Want(vec![("web/site".into(), 7)])),
        Message::Agent(Bytes::from_static(b"opaque to the core")),
        Message::Suite(SuiteMessage::Entries(vec![SuiteEntry {
            key: "web/site".into(),
            version: 7,
            document: Bytes::from_static(b"signed"),
        }])),
    ]
}

fn record() -> Record {
    Record {
        key: Bytes::from_static(b"key"),
        version: Version {
            millis: 1_800_000_000_000,
            counter: 2,
            writer: NodeId(7),
        },
        value: Some(Bytes::from_static(b"value")),
    }
}

#[test]
fn every_message_kind_round_trips() {
    for message in samples() {
        let bytes = wire::encode(&message).unwrap();
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        assert_eq!(wire::decode(&bytes), Ok(message));
    }
}

#[test]
fn every_truncation_of_a_valid_message_is_an_error() {
    for message in samples() {
        let bytes = wire::encode(&message).unwrap();
        for len in 0..bytes.len() {
            assert!(
                wire::decode(&bytes[..len]).is_err(),
                "{} truncated to {len}",
                message.kind()
            );
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng::from_seed(0x5eed);
    let mut accepted = 0;
    for round in 0..200_000u32 {
        let len = rng.index(64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if round % 2 == 0 && !bytes.is_empty() {
            bytes[0] = PROTOCOL_VERSION;
        }
        if wire::decode(&bytes).is_ok() {
            accepted += 1;
        }
    }
    // A handful of short inputs may happen to be valid messages; garbage mostly is not.
    assert!(accepted < 1_000, "{accepted}");
    // And the shortest valid message is accepted: version, Membership, Ping.
    assert!(wire::decode(&[PROTOCOL_VERSION, 0, 7]).is_ok());
}

#[test]
fn mutated_valid_messages_never_panic() {
    let mut rng = Rng::from_seed(42);
    let originals: Vec<Vec<u8>> = samples().iter().map(|m| wire::encode(m).unwrap()).collect();
    for _ in 0..100_000 {
        let mut bytes = rng.choose(&originals).unwrap().clone();
        for _ in 0..=rng.index(3) {
            let at = rng.index(bytes.len());
            bytes[at] = rng.next_u64() as u8;
        }
        let _ = wire::decode(&bytes);
    }
}

#[test]
fn wrong_version_trailing_bytes_and_oversize_are_refused() {
    let mut bytes = wire::encode(&Message::Membership(MembershipMessage::Ping)).unwrap();
    bytes[0] = PROTOCOL_VERSION + 1;
    assert!(matches!(
        wire::decode(&bytes),
        Err(DecodeError::UnknownVersion { .. })
    ));

    let mut bytes = wire::encode(&Message::Membership(MembershipMessage::Ping)).unwrap();
    bytes.push(0);
    assert_eq!(wire::decode(&bytes), Err(DecodeError::TrailingBytes(1)));

    assert_eq!(wire::decode(&[]), Err(DecodeError::Empty));
    let huge = vec![PROTOCOL_VERSION; MESSAGE_BYTES_MAX + 1];
    assert!(matches!(
        wire::decode(&huge),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn lists_beyond_their_bounds_are_refused_both_ways() {
    let too_many_peers = Message::Membership(MembershipMessage::ShuffleReply {
        peers: vec![Peer::new(NodeId(1)); SHUFFLE_PEERS_MAX + 1],
        route: Vec::new(),
    });
    assert!(wire::encode(&too_many_peers).is_err());
    // Encode it by hand to check that the decoder refuses it too.
    let bytes = postcard::to_extend(&too_many_peers, vec![PROTOCOL_VERSION]).unwrap();
    assert_eq!(wire::decode(&bytes), Err(DecodeError::OutOfBounds));

    let too_long_a_route = Message::Membership(MembershipMessage::ShuffleReply {
        peers: Vec::new(),
        route: vec![NodeId(1); SHUFFLE_ROUTE_MAX + 1],
    });
    let bytes = postcard::to_extend(&too_long_a_route, vec![PROTOCOL_VERSION]).unwrap();
    assert_eq!(wire::decode(&bytes), Err(DecodeError::OutOfBounds));

    let too_many_ids = Message::Broadcast(BroadcastMessage::Want(vec![id(1); IDS_MAX + 1]));
    let bytes = postcard::to_extend(&too_many_ids, vec![PROTOCOL_VERSION]).unwrap();
    assert_eq!(wire::decode(&bytes), Err(DecodeError::OutOfBounds));
}

#[test]
fn a_huge_length_prefix_does_not_allocate_its_claim() {
    // Version, Broadcast variant, Want variant, then a varint claiming 2^56 ids.
    let mut bytes = vec![PROTOCOL_VERSION, 1, 6];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(wire::decode(&bytes).is_err());
}
