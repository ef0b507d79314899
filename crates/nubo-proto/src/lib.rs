//! The sans-IO protocol core of nubo.
//!
//! Everything here is a deterministic state machine: time comes in as [`Time`], randomness from
//! a seeded [`Rng`], messages in through `handle_*` methods and out through `poll_*` methods.
//! Nothing here reads a clock, draws OS randomness, touches a file or a socket, or iterates a
//! hash map. The simulator (`nubo-sim`) and the real agent drive the very same [`Node`].
//!
//! Layers, bottom up:
//! - [`membership`]: HyParView partial views, the overlay every other layer uses;
//! - [`broadcast`]: eager push along an epoch-built tree, lazy repair, anti-entropy;
//! - [`aggregation`]: push-pull averaging: cloud size, totals, extremes;
//! - [`slicing`]: each node's rank by an attribute, its slice and top shares;
//! - [`ring`]: the structured overlay: successors, fingers, lookups of key owners;
//! - [`kv`]: the replicated key-value store on the ring's replicas;
//! - [`blob`]: content-addressed chunked blobs stored in the key-value store;
//! - [`liveness`]: which members are gone, confirmed by probes and told once to all;
//! - [`roster`]: every member and what it says of itself, its instances included;
//! - [`coordination`]: one coordinator per service plans it from what the nodes concerned
//!   report, and tells each its task;
//! - [`suite`]: every service description, with its history, the same on every node;
//! - [`service`], [`rollout`]: placement, and how a new version replaces the old one;
//! - [`spec`], [`placement`], [`outcome`]: what the core reads of a service document, the
//!   planning of one service, and the recorded outcomes of its updates;
//! - [`node`]: the composition and its driving contract;
//! - [`wire`]: the versioned, bounded encoding of every message.

pub mod aggregation;
pub mod blob;
pub mod broadcast;
pub mod coordination;
pub mod id;
pub mod instance;
pub mod kv;
pub mod liveness;
pub mod membership;
pub mod node;
pub mod outcome;
pub mod placement;
pub mod ring;
pub mod rng;
pub mod rollout;
pub mod roster;
pub mod service;
pub mod slicing;
pub mod spec;
pub mod suite;
pub mod time;
pub mod view;
pub mod wire;

pub use broadcast::{Delivery, MessageId};
pub use id::{NodeId, Peer};
pub use node::{Config, Event, Node, Transmit};
pub use rng::Rng;
pub use time::Time;
pub use wire::{DecodeError, Message};
