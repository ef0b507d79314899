//! The suite: every service description of the cloud, the same on every node.
//!
//! An entry is a key (`namespace/name`), a version and an opaque signed document. A node takes
//! an entry only if the driver's [`SuiteCheck`] accepts it (signature, grant) and it is newer
//! than what the node has; removal is itself a newer document. New entries spread by broadcast;
//! anti-entropy catches up whoever missed one (a partition, a restart): every `sync_interval`
//! a node sends a neighbour a digest of its entries; if the neighbour's differs, the two swap
//! their lists of versions and then the entries each lacks. The suite converges after any
//! partition, however long, because entries are never forgotten.

use core::time::Duration;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::Peer;
use crate::time::Time;

/// Most entries in a suite.
pub const ENTRIES_MAX: usize = 10_000;
/// Largest document, in bytes.
pub const DOCUMENT_BYTES_MAX: usize = 64 * 1024;
/// Longest entry key.
pub const KEY_BYTES_MAX: usize = 256;
/// Bytes of entries sent in one message.
const BATCH_BYTES_MAX: usize = 512 * 1024;

/// One service's description at one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuiteEntry {
    /// `namespace/name`.
    pub key: String,
    /// Higher replaces lower.
    pub version: u64,
    /// The signed description (or removal), opaque to the core.
    pub document: Bytes,
}

impl SuiteEntry {
    fn size(&self) -> usize {
        self.key.len() + self.document.len() + 16
    }

    fn is_within_bounds(&self) -> bool {
        self.key.len() <= KEY_BYTES_MAX && self.document.len() <= DOCUMENT_BYTES_MAX
    }

    fn fingerprint(&self) -> u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.key.as_bytes());
        hasher.update(&self.version.to_le_bytes());
        hasher.update(&self.document);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// The driver's judgement of an entry: is it signed by someone allowed to write its key?
pub trait SuiteCheck: Send {
    /// Whether `entry` may enter the suite.
    fn accepts(&self, entry: &SuiteEntry) -> bool;
}

/// Accepts every entry (the simulator's check).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl SuiteCheck for AcceptAll {
    fn accepts(&self, _entry: &SuiteEntry) -> bool {
        true
    }
}

/// Messages of suite anti-entropy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SuiteMessage {
    /// The sender's suite in brief.
    Digest {
        /// Entries held.
        count: u32,
        /// Wrapping sum of their fingerprints.
        sum: u64,
    },
    /// Every key and version the sender holds (it saw a different digest).
    Versions(Vec<(String, u64)>),
    /// Entries the sender lacks or holds older.
    Want(Vec<String>),
    /// Entries.
    Entries(Vec<SuiteEntry>),
}

impl SuiteMessage {
    /// Whether every list and entry respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            SuiteMessage::Digest { .. } => true,
            SuiteMessage::Versions(list) => {
                list.len() <= ENTRIES_MAX && list.iter().all(|(k, _)| k.len() <= KEY_BYTES_MAX)
            }
            SuiteMessage::Want(keys) => {
                keys.len() <= ENTRIES_MAX && keys.iter().all(|k| k.len() <= KEY_BYTES_MAX)
            }
            SuiteMessage::Entries(entries) => {
                entries.len() <= ENTRIES_MAX && entries.iter().all(SuiteEntry::is_within_bounds)
            }
        }
    }
}

/// Tuning of the suite.
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    /// Whether this node keeps the suite and runs anti-entropy.
    pub enabled: bool,
    /// How often a node compares its suite with a neighbour's.
    pub sync_interval: Duration,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        SuiteConfig {
            enabled: true,
            sync_interval: Duration::from_secs(5),
        }
    }
}

/// One node's copy of the suite.
///
/// Contract: holds at most [`ENTRIES_MAX`] entries, each accepted by the check; an entry is
/// replaced only by a higher version; every key whose entry changed is reported once by
/// [`Suite::drain_changed`].
pub struct Suite {
    config: SuiteConfig,
    check: Box<dyn SuiteCheck>,
    entries: BTreeMap<String, SuiteEntry>,
    sum: u64,
    changed: Vec<String>,
    transmits: Vec<(Peer, SuiteMessage)>,
    next_sync: Time,
}

impl core::fmt::Debug for Suite {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Suite")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl Suite {
    /// An empty suite that admits what `check` accepts.
    pub fn new(config: SuiteConfig, check: Box<dyn SuiteCheck>, now: Time) -> Suite {
        Suite {
            next_sync: if config.enabled {
                now + config.sync_interval
            } else {
                Time::MAX
            },
            config,
            check,
            entries: BTreeMap::new(),
            sum: 0,
            changed: Vec::new(),
            transmits: Vec::new(),
        }
    }

    /// Replaces the check (the agent installs its signature check after start).
    pub fn set_check(&mut self, check: Box<dyn SuiteCheck>) {
        self.check = check;
    }

    /// Every entry, by key.
    pub fn entries(&self) -> impl Iterator<Item = &SuiteEntry> + '_ {
        self.entries.values()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<&SuiteEntry> {
        self.entries.get(key)
    }

    /// Takes `entry` if it is accepted and newer than what is held; returns whether it did.
    pub fn offer(&mut self, entry: SuiteEntry) -> bool {
        if !self.config.enabled || !entry.is_within_bounds() {
            return false;
        }
        match self.entries.get(&entry.key) {
            Some(held) if held.version >= entry.version => return false,
            None if self.entries.len() >= ENTRIES_MAX => return false,
            _ => {}
        }
        if !self.check.accepts(&entry) {
            return false;
        }
        self.sum = self.sum.wrapping_add(entry.fingerprint());
        if let Some(old) = self.entries.insert(entry.key.clone(), entry.clone()) {
            self.sum = self.sum.wrapping_sub(old.fingerprint());
        }
        self.changed.push(entry.key);
        true
    }

    /// Handles an anti-entropy message from `from`.
    pub fn handle_message(&mut self, from: Peer, message: SuiteMessage) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        match message {
            SuiteMessage::Digest { count, sum } => {
                if count as usize != self.entries.len() || sum != self.sum {
                    let versions = self
                        .entries
                        .values()
                        .map(|e| (e.key.clone(), e.version))
                        .collect();
                    self.transmits
                        .push((from, SuiteMessage::Versions(versions)));
                }
            }
            SuiteMessage::Versions(theirs) => {
                let theirs: BTreeMap<String, u64> = theirs.into_iter().collect();
                let want: Vec<String> = theirs
                    .iter()
                    .filter(|(k, v)| self.entries.get(*k).is_none_or(|e| e.version < **v))
                    .map(|(k, _)| k.clone())
                    .collect();
                if !want.is_empty() {
                    self.transmits.push((from, SuiteMessage::Want(want)));
                }
                let give: Vec<SuiteEntry> = self
                    .entries
                    .values()
                    .filter(|e| theirs.get(&e.key).is_none_or(|v| *v < e.version))
                    .cloned()
                    .collect();
                self.send_entries(from, give);
            }
            SuiteMessage::Want(keys) => {
                let give: Vec<SuiteEntry> = keys
                    .iter()
                    .filter_map(|k| self.entries.get(k).cloned())
                    .collect();
                self.send_entries(from, give);
            }
            SuiteMessage::Entries(entries) => {
                for entry in entries {
                    self.offer(entry);
                }
            }
        }
    }

    fn send_entries(&mut self, to: Peer, entries: Vec<SuiteEntry>) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for entry in entries {
            if bytes + entry.size() > BATCH_BYTES_MAX && !batch.is_empty() {
                self.transmits
                    .push((to, SuiteMessage::Entries(core::mem::take(&mut batch))));
                bytes = 0;
            }
            bytes += entry.size();
            batch.push(entry);
        }
        if !batch.is_empty() {
            self.transmits.push((to, SuiteMessage::Entries(batch)));
        }
    }

    /// When the next comparison with a neighbour is due.
    pub fn poll_timeout(&self) -> Time {
        self.next_sync
    }

    /// Sends `neighbor` a digest, if one is given.
    pub fn handle_timeout(&mut self, now: Time, neighbor: Option<Peer>) {
        if !self.config.enabled || now < self.next_sync {
            return;
        }
        self.next_sync = now + self.config.sync_interval;
        if let Some(peer) = neighbor {
            self.transmits.push((
                peer,
                SuiteMessage::Digest {
                    count: self.entries.len() as u32,
                    sum: self.sum,
                },
            ));
        }
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, SuiteMessage)> {
        self.transmits.drain(..)
    }

    /// Keys whose entry changed since the last call.
    pub fn drain_changed(&mut self) -> std::vec::Drain<'_, String> {
        self.changed.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;

    fn entry(key: &str, version: u64) -> SuiteEntry {
        SuiteEntry {
            key: key.into(),
            version,
            document: Bytes::from(format!("{key}@{version}")),
        }
    }

    struct RefuseOdd;
    impl SuiteCheck for RefuseOdd {
        fn accepts(&self, entry: &SuiteEntry) -> bool {
            entry.version.is_multiple_of(2)
        }
    }

    fn suite() -> Suite {
        Suite::new(SuiteConfig::default(), Box::new(AcceptAll), Time::ZERO)
    }

    /// Runs messages between two suites until they fall silent.
    fn exchange(a: &mut Suite, b: &mut Suite) {
        let (pa, pb) = (Peer::new(NodeId(1)), Peer::new(NodeId(2)));
        a.handle_timeout(Time::from_secs(5), Some(pb));
        for _ in 0..10 {
            let to_b: Vec<_> = a.drain_transmits().map(|(_, m)| m).collect();
            let to_a: Vec<_> = b.drain_transmits().map(|(_, m)| m).collect();
            if to_a.is_empty() && to_b.is_empty() {
                return;
            }
            for m in to_b {
                b.handle_message(pa, m);
            }
            for m in to_a {
                a.handle_message(pb, m);
            }
        }
    }

    #[test]
    fn only_newer_accepted_entries_are_taken() {
        let mut s = Suite::new(SuiteConfig::default(), Box::new(RefuseOdd), Time::ZERO);
        assert!(s.offer(entry("web/site", 2)));
        assert!(!s.offer(entry("web/site", 2)));
        assert!(!s.offer(entry("web/site", 1)));
        assert!(!s.offer(entry("web/site", 3)), "refused by the check");
        assert!(s.offer(entry("web/site", 4)));
        assert_eq!(
            s.drain_changed().collect::<Vec<_>>(),
            vec!["web/site", "web/site"]
        );
        assert_eq!(s.get("web/site").unwrap().version, 4);
    }

    #[test]
    fn anti_entropy_makes_two_suites_equal() {
        let mut a = suite();
        let mut b = suite();
        a.offer(entry("x/1", 1));
        a.offer(entry("x/2", 5));
        b.offer(entry("x/2", 7));
        b.offer(entry("x/3", 1));
        exchange(&mut a, &mut b);
        let list = |s: &Suite| {
            s.entries()
                .map(|e| (e.key.clone(), e.version))
                .collect::<Vec<_>>()
        };
        assert_eq!(list(&a), list(&b));
        assert_eq!(
            list(&a),
            vec![("x/1".into(), 1), ("x/2".into(), 7), ("x/3".into(), 1)]
        );
        // Equal digests: nothing more is said.
        a.handle_timeout(Time::from_secs(10), Some(Peer::new(NodeId(2))));
        let digest: Vec<_> = a.drain_transmits().map(|(_, m)| m).collect();
        b.handle_message(Peer::new(NodeId(1)), digest[0].clone());
        assert_eq!(b.drain_transmits().count(), 0);
    }

    #[test]
    fn oversized_documents_are_refused() {
        let mut s = suite();
        let big = SuiteEntry {
            key: "x/big".into(),
            version: 1,
            document: Bytes::from(vec![0u8; DOCUMENT_BYTES_MAX + 1]),
        };
        assert!(!s.offer(big.clone()));
        assert!(!SuiteMessage::Entries(vec![big]).is_within_bounds());
    }
}
