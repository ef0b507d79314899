//! The suite: every service description of the cloud, the same on every node.
//!
//! An entry is a key (`namespace/name`), a version and an opaque signed document. A node takes
//! an entry only if the driver's [`SuiteCheck`] accepts it (signature, grant). Each key keeps
//! its `history_max` highest versions, so that an update can be reverted and a service rolled
//! back to an earlier description; the highest is the one in force, and an older version never
//! replaces it. A version the check calls the end of a history (a removal) drops the older
//! versions of its key and keeps any older one from coming back.
//!
//! Keys of the form `base#tag` are *annotations* of `base` (the progress of an update, say):
//! one version each, accepted only while `base` is held, forgotten with it.
//!
//! New entries spread by broadcast; anti-entropy catches up whoever missed one (a partition, a
//! restart): every `sync_interval` a node sends a neighbour a digest of its entries; if the
//! neighbour's differs, it lists its versions (in key ranges small enough for one message) and
//! the first node asks for what it lacks and sends what the neighbour lacks. Two different
//! documents of one key and version (two nodes writing one annotation at once) are settled by
//! keeping the one with the greater fingerprint, so every node ends with the same suite.
//!
//! A driver persists the suite (every changed key is reported) and hands it back after a
//! restart with [`Suite::restore`]. Entries restored from a copy too old to trust (the node was
//! away longer than removals are remembered, so it may hold a service removed meanwhile) are
//! *provisional*: they are neither served to peers nor reported as in force until a peer's
//! version list confirms them, and dropped if it lacks them.

use core::time::Duration;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::Peer;
use crate::time::Time;

/// Most entries in a suite, every version of every key counted.
pub const ENTRIES_MAX: usize = 10_000;
/// Largest document, in bytes.
pub const DOCUMENT_BYTES_MAX: usize = 64 * 1024;
/// Longest entry key.
pub const KEY_BYTES_MAX: usize = 256;
/// Bytes of entries sent in one message.
const BATCH_BYTES_MAX: usize = 512 * 1024;
/// Bytes of keys listed in one `Versions` message.
const VERSIONS_BYTES_MAX: usize = 256 * 1024;
/// Marks an annotation key: `base#tag`.
pub const ANNOTATION_MARK: char = '#';

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

/// A suite entry as its encoding holds it, borrowed: decoding it this way lets the entry share
/// the received buffer ([`SuiteEntry::decode_shared`]) instead of copying its document.
#[derive(Deserialize)]
struct SuiteEntryRef<'a> {
    key: &'a str,
    version: u64,
    document: &'a [u8],
}

impl SuiteEntry {
    /// Decodes an entry encoded in `encoded[skip..]` (as [`Serialize`] writes it), whose
    /// document shares `encoded`'s buffer: a node keeps the broadcast it received, not a
    /// copy of it.
    pub fn decode_shared(encoded: &Bytes, skip: usize) -> Option<SuiteEntry> {
        let entry: SuiteEntryRef<'_> = postcard::from_bytes(encoded.get(skip..)?).ok()?;
        Some(SuiteEntry {
            key: entry.key.to_string(),
            version: entry.version,
            document: encoded.slice_ref(entry.document),
        })
    }

    fn size(&self) -> usize {
        self.key.len() + self.document.len() + 16
    }

    fn is_within_bounds(&self) -> bool {
        self.key.len() <= KEY_BYTES_MAX && self.document.len() <= DOCUMENT_BYTES_MAX
    }

    /// A hash of key, version and document.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.key.as_bytes());
        hasher.update(&self.version.to_le_bytes());
        hasher.update(&self.document);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// The base key of an annotation (`web/site` of `web/site#status`), or `None` for a key that
/// is no annotation.
pub fn annotated(key: &str) -> Option<&str> {
    key.split_once(ANNOTATION_MARK).map(|(base, _)| base)
}

/// The driver's judgement of an entry: is it signed by someone allowed to write its key?
pub trait SuiteCheck: Send {
    /// Whether `entry` may enter the suite.
    fn accepts(&self, entry: &SuiteEntry) -> bool;

    /// Whether `entry`, in force, makes the older versions of its key worthless (a removal).
    fn ends_history(&self, _entry: &SuiteEntry) -> bool {
        false
    }
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
        /// Entries held (provisional ones not counted).
        count: u32,
        /// Wrapping sum of their fingerprints.
        sum: u64,
        /// The sender holds provisional entries it wants confirmed.
        provisional: bool,
    },
    /// Every version the sender holds of the keys in `[from, to)` (`to = None`: to the end),
    /// with the fingerprint of each.
    Versions {
        /// First key of the range.
        from: String,
        /// End of the range, exclusive.
        to: Option<String>,
        /// `(key, version, fingerprint)`, by key then version.
        list: Vec<(String, u64, u64)>,
    },
    /// Entries the sender lacks, by key and version.
    Want(Vec<(String, u64)>),
    /// Entries.
    Entries(Vec<SuiteEntry>),
}

impl SuiteMessage {
    /// Whether every list and entry respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            SuiteMessage::Digest { .. } => true,
            SuiteMessage::Versions { from, to, list } => {
                from.len() <= KEY_BYTES_MAX
                    && to.as_ref().is_none_or(|t| t.len() <= KEY_BYTES_MAX)
                    && list.len() <= ENTRIES_MAX
                    && list.iter().all(|(k, _, _)| k.len() <= KEY_BYTES_MAX)
            }
            SuiteMessage::Want(keys) => {
                keys.len() <= ENTRIES_MAX && keys.iter().all(|(k, _)| k.len() <= KEY_BYTES_MAX)
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
    /// Versions kept per key (annotations keep one).
    pub history_max: usize,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        SuiteConfig {
            enabled: true,
            sync_interval: Duration::from_secs(10),
            history_max: 10,
        }
    }
}

/// What the suite did since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SuiteCounters {
    /// Digests sent to a neighbour (anti-entropy rounds started).
    pub syncs: u64,
    /// Version lists sent (rounds that found a difference).
    pub version_lists: u64,
    /// Entries taken (new versions, from anyone).
    pub taken: u64,
    /// Entries refused by the check.
    pub refused: u64,
}

#[derive(Clone, Debug)]
struct Held {
    entry: SuiteEntry,
    fingerprint: u64,
    provisional: bool,
}

/// The versions held of one key, sorted: a few at most (`history_max`), so a vector, which
/// costs a tenth of a map's smallest node per key.
#[derive(Clone, Debug, Default)]
struct Versions(Vec<(u64, Held)>);

impl Versions {
    fn get(&self, version: &u64) -> Option<&Held> {
        self.0
            .binary_search_by_key(version, |(v, _)| *v)
            .ok()
            .map(|i| &self.0[i].1)
    }

    fn insert(&mut self, version: u64, held: Held) -> Option<Held> {
        match self.0.binary_search_by_key(&version, |(v, _)| *v) {
            Ok(i) => Some(core::mem::replace(&mut self.0[i].1, held)),
            Err(i) => {
                // One more place, not the usual doubling: most keys hold one version.
                self.0.reserve_exact(1);
                self.0.insert(i, (version, held));
                None
            }
        }
    }

    fn first_key_value(&self) -> Option<(&u64, &Held)> {
        self.0.first().map(|(v, h)| (v, h))
    }

    fn last_key_value(&self) -> Option<(&u64, &Held)> {
        self.0.last().map(|(v, h)| (v, h))
    }

    fn pop_first(&mut self) -> Option<(u64, Held)> {
        (!self.0.is_empty()).then(|| self.0.remove(0))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn values(&self) -> impl DoubleEndedIterator<Item = &Held> + '_ {
        self.0.iter().map(|(_, h)| h)
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Held)> + '_ {
        self.0.iter().map(|(v, h)| (v, h))
    }

    fn retain(&mut self, mut keep: impl FnMut(&u64, &mut Held) -> bool) {
        self.0.retain_mut(|(v, h)| keep(v, h));
    }
}

/// One node's copy of the suite.
///
/// Contract: holds at most [`ENTRIES_MAX`] entries, each accepted by the check (or restored by
/// the driver), at most `history_max` versions of a key and one of an annotation; the entry in
/// force for a key is its highest version and only a higher version replaces it; every key whose
/// versions changed is reported once by [`Suite::drain_changed`].
pub struct Suite {
    config: SuiteConfig,
    check: Box<dyn SuiteCheck>,
    keys: BTreeMap<String, Versions>,
    count: usize,
    sum: u64,
    provisional: usize,
    changed: Vec<String>,
    transmits: Vec<(Peer, SuiteMessage)>,
    next_sync: Time,
    counters: SuiteCounters,
}

impl core::fmt::Debug for Suite {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Suite")
            .field("keys", &self.keys.len())
            .field("entries", &self.count)
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
            keys: BTreeMap::new(),
            count: 0,
            sum: 0,
            provisional: 0,
            changed: Vec::new(),
            transmits: Vec::new(),
            counters: SuiteCounters::default(),
        }
    }

    /// What the suite did since start.
    pub fn counters(&self) -> SuiteCounters {
        self.counters
    }

    /// Replaces the check (the agent installs its signature check after start).
    pub fn set_check(&mut self, check: Box<dyn SuiteCheck>) {
        self.check = check;
    }

    /// The entry in force of every key that has a confirmed one, by key.
    pub fn entries(&self) -> impl Iterator<Item = &SuiteEntry> + '_ {
        self.keys.values().filter_map(latest)
    }

    /// The entry in force of `key`.
    pub fn get(&self, key: &str) -> Option<&SuiteEntry> {
        self.keys.get(key).and_then(latest)
    }

    /// Every confirmed version held of `key`, oldest first.
    pub fn history(&self, key: &str) -> impl Iterator<Item = &SuiteEntry> + '_ {
        self.keys
            .get(key)
            .into_iter()
            .flat_map(|versions| versions.values())
            .filter(|h| !h.provisional)
            .map(|h| &h.entry)
    }

    /// Every version held of `key`, provisional ones included (flagged), oldest first: what a
    /// driver saves.
    pub fn stored(&self, key: &str) -> Vec<(SuiteEntry, bool)> {
        self.keys
            .get(key)
            .map(|versions| {
                versions
                    .values()
                    .map(|h| (h.entry.clone(), h.provisional))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Entries held, every version counted.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the suite holds nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Entries restored from a stale copy and not yet confirmed by a peer.
    pub fn provisional(&self) -> usize {
        self.provisional
    }

    fn history_max(&self, key: &str) -> usize {
        if annotated(key).is_some() {
            1
        } else {
            self.config.history_max.max(1)
        }
    }

    /// Whether `entry` would find a place: a version not held (or held with a smaller
    /// fingerprint), among the newest the key keeps, not older than a removal in force, and,
    /// for an annotation, of a key held.
    fn has_room_for(&self, key: &str, version: u64, fingerprint: u64) -> bool {
        if let Some(base) = annotated(key)
            && self.get(base).is_none()
        {
            return false;
        }
        let Some(versions) = self.keys.get(key) else {
            return self.count < ENTRIES_MAX;
        };
        if let Some(held) = versions.get(&version) {
            return fingerprint > held.fingerprint;
        }
        if let Some((&newest, held)) = versions.last_key_value()
            && version < newest
            && self.check.ends_history(&held.entry)
        {
            return false;
        }
        let full = versions.len() >= self.history_max(key);
        if full
            && versions
                .first_key_value()
                .is_some_and(|(&v, _)| version < v)
        {
            return false;
        }
        full || self.count < ENTRIES_MAX
    }

    /// Takes `entry` if it is accepted and finds a place; returns whether it did.
    pub fn offer(&mut self, entry: SuiteEntry) -> bool {
        if !self.config.enabled || !entry.is_within_bounds() {
            return false;
        }
        let fingerprint = entry.fingerprint();
        if !self.has_room_for(&entry.key, entry.version, fingerprint) {
            return false;
        }
        if !self.check.accepts(&entry) {
            self.counters.refused += 1;
            return false;
        }
        self.counters.taken += 1;
        self.insert(entry, fingerprint, false);
        true
    }

    /// Takes back an entry the driver saved (no check: the driver's own disk). `provisional`:
    /// the copy is too old to trust until a peer confirms it. Returns whether it was taken.
    pub fn restore(&mut self, entry: SuiteEntry, provisional: bool) -> bool {
        if !self.config.enabled || !entry.is_within_bounds() {
            return false;
        }
        let fingerprint = entry.fingerprint();
        // Annotations may be restored before their base: the base is checked once all is back.
        let room = match annotated(&entry.key) {
            Some(_) => self.count < ENTRIES_MAX,
            None => self.has_room_for(&entry.key, entry.version, fingerprint),
        };
        if !room {
            return false;
        }
        self.insert(entry, fingerprint, provisional);
        true
    }

    fn insert(&mut self, entry: SuiteEntry, fingerprint: u64, provisional: bool) {
        let key = entry.key.clone();
        let history_max = self.history_max(&key);
        let version = entry.version;
        let versions = self.keys.entry(key.clone()).or_default();
        let mut removed = Vec::new();
        if let Some(old) = versions.insert(
            version,
            Held {
                entry,
                fingerprint,
                provisional,
            },
        ) {
            removed.push(old);
        }
        // A removal in force ends the history; otherwise keep the newest `history_max`.
        let ends = versions
            .last_key_value()
            .is_some_and(|(_, h)| self.check.ends_history(&h.entry));
        let keep = if ends { 1 } else { history_max };
        while versions.len() > keep {
            if let Some((_, old)) = versions.pop_first() {
                removed.push(old);
            }
        }
        if !provisional {
            self.sum = self.sum.wrapping_add(fingerprint);
        }
        self.count += 1;
        self.provisional += usize::from(provisional);
        for old in removed {
            self.account_removed(&old);
        }
        self.changed.push(key);
    }

    fn account_removed(&mut self, old: &Held) {
        self.count -= 1;
        if old.provisional {
            self.provisional -= 1;
        } else {
            self.sum = self.sum.wrapping_sub(old.fingerprint);
        }
    }

    /// Forgets `key`, every version of it and its annotations (a removal remembered long
    /// enough). Returns whether anything was held.
    pub fn forget(&mut self, key: &str) -> bool {
        let annotations: Vec<String> = self
            .keys
            .range::<str, _>((core::ops::Bound::Excluded(key), core::ops::Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(key))
            .filter(|k| annotated(k) == Some(key))
            .cloned()
            .collect();
        let mut found = false;
        for k in annotations.iter().map(String::as_str).chain([key]) {
            if let Some(versions) = self.keys.remove(k) {
                for held in versions.values() {
                    self.account_removed(held);
                }
                self.changed.push(k.to_string());
                found = true;
            }
        }
        found
    }

    /// Confirms every provisional entry (a node with no peer to ask).
    pub fn confirm_all(&mut self) {
        if self.provisional == 0 {
            return;
        }
        let keys: Vec<String> = self.keys.keys().cloned().collect();
        for key in keys {
            self.confirm_where(&key, |_| true);
        }
    }

    /// Confirms the provisional versions of `key` that `keep` approves and drops the others.
    fn confirm_where(&mut self, key: &str, keep: impl Fn(u64) -> bool) {
        let Some(versions) = self.keys.get_mut(key) else {
            return;
        };
        let mut confirmed = Vec::new();
        let mut dropped = Vec::new();
        versions.retain(|&version, held| {
            if !held.provisional {
                return true;
            }
            if keep(version) {
                held.provisional = false;
                confirmed.push(held.fingerprint);
                true
            } else {
                dropped.push(held.clone());
                false
            }
        });
        if versions.is_empty() {
            self.keys.remove(key);
        }
        if confirmed.is_empty() && dropped.is_empty() {
            return;
        }
        for fingerprint in confirmed {
            self.provisional -= 1;
            self.sum = self.sum.wrapping_add(fingerprint);
        }
        for held in &dropped {
            self.account_removed(held);
        }
        self.changed.push(key.to_string());
    }

    /// Handles an anti-entropy message from `from`.
    pub fn handle_message(&mut self, from: Peer, message: SuiteMessage) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        match message {
            SuiteMessage::Digest {
                count,
                sum,
                provisional,
            } => {
                if provisional
                    || self.provisional > 0
                    || count as usize != self.count - self.provisional
                    || sum != self.sum
                {
                    self.send_versions(from);
                }
            }
            SuiteMessage::Versions {
                from: start,
                to,
                list,
            } => {
                self.on_versions(from, &start, to.as_deref(), list);
            }
            SuiteMessage::Want(wanted) => {
                let give: Vec<SuiteEntry> = wanted
                    .iter()
                    .filter_map(|(k, v)| self.keys.get(k)?.get(v))
                    .filter(|h| !h.provisional)
                    .map(|h| h.entry.clone())
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

    /// Lists every version held to `to`, in ranges of keys that fit one message each.
    fn send_versions(&mut self, to: Peer) {
        let mut from = String::new();
        let mut list = Vec::new();
        let mut bytes = 0;
        let mut messages = Vec::new();
        for (key, versions) in &self.keys {
            let size = versions.len() * (key.len() + 20);
            if bytes + size > VERSIONS_BYTES_MAX && !list.is_empty() {
                messages.push(SuiteMessage::Versions {
                    from: core::mem::replace(&mut from, key.clone()),
                    to: Some(key.clone()),
                    list: core::mem::take(&mut list),
                });
                bytes = 0;
            }
            bytes += size;
            list.extend(
                versions
                    .iter()
                    .map(|(v, h)| (key.clone(), *v, h.fingerprint)),
            );
        }
        messages.push(SuiteMessage::Versions {
            from,
            to: None,
            list,
        });
        self.counters.version_lists += messages.len() as u64;
        self.transmits
            .extend(messages.into_iter().map(|message| (to, message)));
    }

    fn on_versions(
        &mut self,
        from: Peer,
        start: &str,
        end: Option<&str>,
        theirs: Vec<(String, u64, u64)>,
    ) {
        let in_range = |key: &str| key >= start && end.is_none_or(|end| key < end);
        let theirs: BTreeMap<(String, u64), u64> =
            theirs.into_iter().map(|(k, v, f)| ((k, v), f)).collect();
        // Provisional entries in the range: confirmed if the peer holds them, dropped if not.
        if self.provisional > 0 {
            let keys: Vec<String> = self.keys.keys().filter(|k| in_range(k)).cloned().collect();
            for key in keys {
                self.confirm_where(&key, |version| theirs.contains_key(&(key.clone(), version)));
            }
        }
        // An annotation is wanted with its base when both are missing.
        let base_coming = |key: &str| {
            annotated(key).is_some_and(|base| {
                self.get(base).is_none()
                    && theirs
                        .range((base.to_string(), 0)..)
                        .next()
                        .is_some_and(|((k, _), _)| k == base)
            })
        };
        let want: Vec<(String, u64)> = theirs
            .iter()
            .filter(|((k, v), f)| in_range(k) && (self.has_room_for(k, *v, **f) || base_coming(k)))
            .map(|(kv, _)| kv.clone())
            .collect();
        if !want.is_empty() {
            self.transmits.push((from, SuiteMessage::Want(want)));
        }
        let give: Vec<SuiteEntry> = self
            .keys
            .iter()
            .filter(|(k, _)| in_range(k))
            .flat_map(|(_, versions)| versions.values())
            .filter(|h| {
                !h.provisional
                    && theirs
                        .get(&(h.entry.key.clone(), h.entry.version))
                        .is_none_or(|f| *f < h.fingerprint)
            })
            .map(|h| h.entry.clone())
            .collect();
        self.send_entries(from, give);
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

    /// Sends `neighbor` a digest, if one is given and we hold anything: a node that holds
    /// nothing has nothing to offer, and learns the suite from its neighbours' digests.
    pub fn handle_timeout(&mut self, now: Time, neighbor: Option<Peer>) {
        if !self.config.enabled || now < self.next_sync {
            return;
        }
        self.next_sync = now + self.config.sync_interval;
        if self.count == 0 {
            return;
        }
        if let Some(peer) = neighbor {
            self.counters.syncs += 1;
            self.transmits.push((
                peer,
                SuiteMessage::Digest {
                    count: (self.count - self.provisional) as u32,
                    sum: self.sum,
                    provisional: self.provisional > 0,
                },
            ));
        }
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, SuiteMessage)> {
        self.transmits.drain(..)
    }

    /// Keys whose versions changed since the last call (a key may appear more than once).
    pub fn drain_changed(&mut self) -> std::vec::Drain<'_, String> {
        self.changed.drain(..)
    }
}

/// The highest confirmed version of a key.
fn latest(versions: &Versions) -> Option<&SuiteEntry> {
    versions
        .values()
        .rev()
        .find(|h| !h.provisional)
        .map(|h| &h.entry)
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

    #[test]
    fn a_decoded_entry_shares_the_received_buffer() {
        let sent = entry("web/site", 7);
        let encoded = Bytes::from(postcard::to_extend(&sent, vec![2u8]).unwrap());
        let received = SuiteEntry::decode_shared(&encoded, 1).expect("decodes");
        assert_eq!(received, sent);
        let range = encoded.as_ptr_range();
        assert!(range.contains(&received.document.as_ptr()), "no copy");
        // Garbage, a cut encoding or a skip past the end is refused, not a panic.
        assert_eq!(SuiteEntry::decode_shared(&encoded.slice(..6), 1), None);
        assert_eq!(SuiteEntry::decode_shared(&encoded, 99), None);
        assert_eq!(
            SuiteEntry::decode_shared(&Bytes::from_static(&[2, 255, 255, 255]), 1),
            None
        );
    }

    /// Refuses odd versions; a document starting with "rm" ends its key's history.
    struct RefuseOdd;
    impl SuiteCheck for RefuseOdd {
        fn accepts(&self, entry: &SuiteEntry) -> bool {
            entry.version.is_multiple_of(2)
        }
        fn ends_history(&self, entry: &SuiteEntry) -> bool {
            entry.document.starts_with(b"rm")
        }
    }

    fn suite() -> Suite {
        Suite::new(SuiteConfig::default(), Box::new(AcceptAll), Time::ZERO)
    }

    fn small(history_max: usize) -> Suite {
        Suite::new(
            SuiteConfig {
                history_max,
                ..SuiteConfig::default()
            },
            Box::new(RefuseOdd),
            Time::ZERO,
        )
    }

    /// Runs messages between two suites until they fall silent; returns the messages sent
    /// after the first digest.
    fn exchange(a: &mut Suite, b: &mut Suite) -> usize {
        let (pa, pb) = (Peer::new(NodeId(1)), Peer::new(NodeId(2)));
        a.next_sync = Time::ZERO;
        a.handle_timeout(Time::from_secs(5), Some(pb));
        let mut sent = 0;
        for _ in 0..10 {
            let to_b: Vec<_> = a.drain_transmits().map(|(_, m)| m).collect();
            let to_a: Vec<_> = b.drain_transmits().map(|(_, m)| m).collect();
            if to_a.is_empty() && to_b.is_empty() {
                return sent - 1;
            }
            sent += to_a.len() + to_b.len();
            for m in to_b {
                b.handle_message(pa, m);
            }
            for m in to_a {
                a.handle_message(pb, m);
            }
        }
        panic!("the exchange did not end");
    }

    fn list(s: &Suite) -> Vec<(String, u64)> {
        s.keys
            .values()
            .flat_map(|v| v.values())
            .map(|h| (h.entry.key.clone(), h.entry.version))
            .collect()
    }

    #[test]
    fn the_newest_version_is_in_force_and_history_is_bounded() {
        let mut s = small(3);
        assert!(s.offer(entry("web/site", 4)));
        assert!(!s.offer(entry("web/site", 4)), "held already");
        assert!(!s.offer(entry("web/site", 5)), "refused by the check");
        assert!(
            s.offer(entry("web/site", 2)),
            "an older version joins the history"
        );
        assert_eq!(s.get("web/site").unwrap().version, 4, "but is not in force");
        assert!(s.offer(entry("web/site", 8)));
        assert!(s.offer(entry("web/site", 6)));
        assert_eq!(
            s.history("web/site").map(|e| e.version).collect::<Vec<_>>(),
            vec![4, 6, 8],
            "the oldest went"
        );
        assert!(
            !s.offer(entry("web/site", 2)),
            "older than every version kept"
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s.drain_changed().count(), 4);
    }

    #[test]
    fn a_removal_ends_the_history_and_keeps_older_versions_out() {
        let mut s = small(5);
        s.offer(entry("web/site", 2));
        s.offer(entry("web/site", 4));
        let removal = SuiteEntry {
            document: Bytes::from_static(b"rm"),
            ..entry("web/site", 6)
        };
        assert!(s.offer(removal));
        assert_eq!(s.history("web/site").count(), 1);
        assert!(
            !s.offer(entry("web/site", 4)),
            "a replay of an older version"
        );
        assert!(s.offer(entry("web/site", 8)), "deployed again");
        assert_eq!(s.history("web/site").count(), 2);
    }

    #[test]
    fn annotations_need_their_base_and_go_with_it() {
        let mut s = suite();
        assert!(!s.offer(entry("web/site#status", 1)), "no base yet");
        s.offer(entry("web/site", 1));
        s.offer(entry("web/siteb", 1));
        assert!(s.offer(entry("web/site#status", 1)));
        assert!(s.offer(entry("web/site#status", 2)));
        assert_eq!(s.history("web/site#status").count(), 1, "one version");
        s.drain_changed().for_each(drop);
        assert!(s.forget("web/site"));
        assert_eq!(
            s.drain_changed().collect::<Vec<_>>(),
            vec!["web/site#status", "web/site"]
        );
        assert_eq!(list(&s), vec![("web/siteb".into(), 1)]);
        assert_eq!(s.sum, entry("web/siteb", 1).fingerprint());
    }

    #[test]
    fn anti_entropy_makes_two_suites_equal_history_included() {
        let mut a = suite();
        let mut b = suite();
        a.offer(entry("x/1", 1));
        a.offer(entry("x/2", 5));
        b.offer(entry("x/2", 7));
        b.offer(entry("x/3", 1));
        b.offer(entry("x/3#status", 1));
        exchange(&mut a, &mut b);
        assert_eq!(list(&a), list(&b));
        assert_eq!(
            list(&a),
            vec![
                ("x/1".into(), 1),
                ("x/2".into(), 5),
                ("x/2".into(), 7),
                ("x/3".into(), 1),
                ("x/3#status".into(), 1),
            ]
        );
        // Equal digests: nothing more is said.
        assert_eq!(exchange(&mut a, &mut b), 0);
    }

    #[test]
    fn two_documents_of_one_version_settle_on_the_same_one() {
        let mut a = suite();
        let mut b = suite();
        a.offer(entry("x/1", 1));
        b.offer(entry("x/1", 1));
        let one = SuiteEntry {
            document: Bytes::from_static(b"one"),
            ..entry("x/1#status", 3)
        };
        let two = SuiteEntry {
            document: Bytes::from_static(b"two"),
            ..entry("x/1#status", 3)
        };
        a.offer(one.clone());
        b.offer(two.clone());
        exchange(&mut a, &mut b);
        let winner = if one.fingerprint() > two.fingerprint() {
            one
        } else {
            two
        };
        assert_eq!(a.get("x/1#status"), Some(&winner));
        assert_eq!(b.get("x/1#status"), Some(&winner));
        assert_eq!(exchange(&mut a, &mut b), 0);
    }

    #[test]
    fn provisional_entries_are_confirmed_by_a_peer_or_dropped() {
        let mut peer = suite();
        peer.offer(entry("x/kept", 1));
        peer.offer(entry("x/new", 1));
        let mut stale = suite();
        assert!(stale.restore(entry("x/kept", 1), true));
        assert!(stale.restore(entry("x/removed-meanwhile", 1), true));
        assert_eq!(stale.provisional(), 2);
        assert_eq!(stale.entries().count(), 0, "nothing in force yet");
        exchange(&mut stale, &mut peer);
        assert_eq!(stale.provisional(), 0);
        assert_eq!(
            list(&stale),
            vec![("x/kept".into(), 1), ("x/new".into(), 1)]
        );
        assert_eq!(list(&peer), list(&stale), "the stale entry never left");
        // A whole cloud back from a long stop: its members confirm each other.
        let mut a = suite();
        let mut b = suite();
        a.restore(entry("x/1", 1), true);
        b.restore(entry("x/1", 1), true);
        exchange(&mut a, &mut b);
        exchange(&mut b, &mut a);
        assert_eq!(a.entries().count(), 1);
        assert_eq!(b.entries().count(), 1);
        let mut alone = suite();
        alone.restore(entry("x/1", 1), true);
        alone.confirm_all();
        assert_eq!(alone.entries().count(), 1);
    }

    #[test]
    fn long_version_lists_are_split_into_ranges() {
        let mut a = suite();
        let mut b = suite();
        let key = |i: usize| format!("ns/{i:04}-{}", "k".repeat(200));
        for i in 0..2_000 {
            a.offer(entry(&key(i), 1));
        }
        b.offer(entry(&key(5), 1));
        b.offer(entry(&key(1_500), 2));
        let pb = Peer::new(NodeId(2));
        b.handle_message(
            Peer::new(NodeId(1)),
            SuiteMessage::Digest {
                count: 2_000,
                sum: a.sum,
                provisional: false,
            },
        );
        let versions: Vec<_> = b.drain_transmits().collect();
        assert_eq!(versions.len(), 1);
        a.handle_message(
            pb,
            SuiteMessage::Digest {
                count: 2,
                sum: b.sum,
                provisional: false,
            },
        );
        let ranges: Vec<_> = a.drain_transmits().map(|(_, m)| m).collect();
        assert!(ranges.len() > 1, "{} messages", ranges.len());
        for m in &ranges {
            assert!(crate::wire::encode(&crate::wire::Message::Suite(m.clone())).is_ok());
        }
        exchange(&mut a, &mut b);
        assert_eq!(b.len(), 2_001);
        assert_eq!(a.len(), 2_001);
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
