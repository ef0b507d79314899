//! Blobs: large immutable contents (service artifacts) split into chunks and stored in the
//! key-value store under content-addressed keys.
//!
//! A chunk is stored under `cas/` followed by the BLAKE3 hash of its bytes. A blob's manifest
//! (its size, chunk size and chunk hashes) is stored the same way, and the hash of the manifest
//! is the blob's id. Every replica checks a content-addressed record before storing it, and
//! every read checks it again, so a corrupted copy is never returned: it is refused and the
//! value is read from another replica.

use core::fmt;
use core::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Prefix of content-addressed keys.
pub const CONTENT_PREFIX: &[u8] = b"cas/";
/// Size of every chunk but the last.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Most chunks in one blob (1 GiB with the default chunk size).
pub const CHUNKS_MAX: usize = 4096;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// Why a blob could not be made or read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The content is larger than a blob may be.
    #[error("a blob holds at most {max} bytes, this one has {size}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The manifest is not a valid one.
    #[error("malformed blob manifest: {0}")]
    Manifest(String),
    /// A chunk does not hash to what the manifest says.
    #[error("chunk {index} does not match its hash")]
    Corrupt {
        /// Which chunk.
        index: usize,
    },
}

/// The id of a blob: the hash of its manifest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobId(pub Hash);

impl BlobId {
    /// The key its manifest is stored under.
    pub fn key(&self) -> Bytes {
        content_key(&self.0)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

/// Error parsing a [`BlobId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a blob id is 64 hexadecimal digits")]
pub struct ParseBlobIdError;

impl FromStr for BlobId {
    type Err = ParseBlobIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(ParseBlobIdError);
        }
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ParseBlobIdError)?;
        }
        Ok(BlobId(hash))
    }
}

/// The key a content with hash `hash` is stored under.
pub fn content_key(hash: &Hash) -> Bytes {
    let mut key = Vec::with_capacity(CONTENT_PREFIX.len() + 32);
    key.extend_from_slice(CONTENT_PREFIX);
    key.extend_from_slice(hash);
    Bytes::from(key)
}

/// Whether `key` names content by its hash.
pub fn is_content_key(key: &[u8]) -> bool {
    key.len() == CONTENT_PREFIX.len() + 32 && key.starts_with(CONTENT_PREFIX)
}

/// Whether `value` may be stored under `key`: always for ordinary keys, only if it hashes to
/// the key for content-addressed ones.
pub fn verify(key: &[u8], value: &[u8]) -> bool {
    !is_content_key(key) || blake3::hash(value).as_bytes() == &key[CONTENT_PREFIX.len()..]
}

/// What a blob is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Total bytes.
    pub size: u64,
    /// Bytes of every chunk but the last.
    pub chunk_bytes: u32,
    /// Hash of each chunk, in order.
    pub chunks: Vec<Hash>,
}

impl Manifest {
    /// The manifest's bytes, as stored.
    pub fn encode(&self) -> Bytes {
        Bytes::from(postcard::to_allocvec(self).unwrap_or_default())
    }

    /// Reads a manifest, checking that its chunks add up to its size.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, BlobError> {
        let manifest: Manifest =
            postcard::from_bytes(bytes).map_err(|e| BlobError::Manifest(e.to_string()))?;
        let chunk = u64::from(manifest.chunk_bytes);
        if chunk == 0 || chunk > CHUNK_BYTES as u64 {
            return Err(BlobError::Manifest(format!("chunk size {chunk}")));
        }
        if manifest.chunks.len() > CHUNKS_MAX
            || manifest.chunks.len() as u64 != manifest.size.div_ceil(chunk)
        {
            return Err(BlobError::Manifest(format!(
                "{} chunks of {chunk} bytes cannot hold {} bytes",
                manifest.chunks.len(),
                manifest.size
            )));
        }
        Ok(manifest)
    }

    /// The blob's id.
    pub fn id(&self) -> BlobId {
        BlobId(*blake3::hash(&self.encode()).as_bytes())
    }

    /// Size of chunk `index`.
    pub fn chunk_size(&self, index: usize) -> usize {
        let chunk = u64::from(self.chunk_bytes);
        let start = chunk * index as u64;
        (self.size.saturating_sub(start)).min(chunk) as usize
    }
}

/// The id `content` has as a blob (what [`split`] would give), without copying it; `None`
/// if it is too large to be one.
pub fn id_of(content: &[u8]) -> Option<BlobId> {
    if content.len() > CHUNK_BYTES * CHUNKS_MAX {
        return None;
    }
    let manifest = Manifest {
        size: content.len() as u64,
        chunk_bytes: CHUNK_BYTES as u32,
        chunks: content
            .chunks(CHUNK_BYTES)
            .map(|piece| *blake3::hash(piece).as_bytes())
            .collect(),
    };
    Some(manifest.id())
}

/// Splits `content` into chunks: the manifest, and each distinct chunk with its hash.
pub fn split(content: &[u8]) -> Result<(Manifest, Vec<(Hash, Bytes)>), BlobError> {
    let max = (CHUNK_BYTES * CHUNKS_MAX) as u64;
    if content.len() as u64 > max {
        return Err(BlobError::TooLarge {
            size: content.len() as u64,
            max,
        });
    }
    let mut hashes = Vec::new();
    let mut chunks: Vec<(Hash, Bytes)> = Vec::new();
    for piece in content.chunks(CHUNK_BYTES) {
        let hash = *blake3::hash(piece).as_bytes();
        hashes.push(hash);
        if !chunks.iter().any(|(h, _)| *h == hash) {
            chunks.push((hash, Bytes::copy_from_slice(piece)));
        }
    }
    let manifest = Manifest {
        size: content.len() as u64,
        chunk_bytes: CHUNK_BYTES as u32,
        chunks: hashes,
    };
    Ok((manifest, chunks))
}

/// A blob being put back together from chunks that arrive in any order.
#[derive(Clone, Debug)]
pub struct Assembly {
    manifest: Manifest,
    parts: Vec<Option<Bytes>>,
    missing: usize,
}

impl Assembly {
    /// Waits for the chunks of `manifest`.
    pub fn new(manifest: Manifest) -> Assembly {
        let count = manifest.chunks.len();
        Assembly {
            manifest,
            parts: vec![None; count],
            missing: count,
        }
    }

    /// Indices of chunks still missing.
    pub fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_none())
            .map(|(i, _)| i)
    }

    /// Takes chunk `index`, refusing bytes that do not match its hash.
    pub fn add(&mut self, index: usize, bytes: Bytes) -> Result<(), BlobError> {
        let Some(expected) = self.manifest.chunks.get(index) else {
            return Err(BlobError::Corrupt { index });
        };
        if blake3::hash(&bytes).as_bytes() != expected
            || bytes.len() != self.manifest.chunk_size(index)
        {
            return Err(BlobError::Corrupt { index });
        }
        // The same chunk may appear at several indices; fill them all.
        for i in 0..self.parts.len() {
            if self.parts[i].is_none() && self.manifest.chunks[i] == *expected {
                self.parts[i] = Some(bytes.clone());
                self.missing -= 1;
            }
        }
        Ok(())
    }

    /// Whether every chunk is here.
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// The content, once complete.
    pub fn finish(self) -> Option<Vec<u8>> {
        if !self.is_complete() {
            return None;
        }
        let mut content = Vec::with_capacity(self.manifest.size as usize);
        for part in self.parts.into_iter().flatten() {
            content.extend_from_slice(&part);
        }
        Some(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn splits_into_chunks_and_back() {
        let data = content(CHUNK_BYTES * 2 + 100);
        let (manifest, chunks) = split(&data).unwrap();
        assert_eq!(manifest.chunks.len(), 3);
        assert_eq!(manifest.chunk_size(2), 100);
        assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
        let mut assembly = Assembly::new(manifest.clone());
        for (index, hash) in manifest.chunks.iter().enumerate().rev() {
            let (_, bytes) = chunks.iter().find(|(h, _)| h == hash).unwrap();
            assembly.add(index, bytes.clone()).unwrap();
        }
        assert_eq!(assembly.finish(), Some(data));
    }

    #[test]
    fn repeated_chunks_are_stored_once() {
        let data = vec![0u8; CHUNK_BYTES * 3];
        let (manifest, chunks) = split(&data).unwrap();
        assert_eq!(manifest.chunks.len(), 3);
        assert_eq!(chunks.len(), 1);
        let mut assembly = Assembly::new(manifest);
        assembly.add(1, chunks[0].1.clone()).unwrap();
        assert_eq!(assembly.finish().map(|c| c.len()), Some(CHUNK_BYTES * 3));
    }

    #[test]
    fn a_corrupted_chunk_is_refused() {
        let data = content(1000);
        let (manifest, chunks) = split(&data).unwrap();
        let mut bad = chunks[0].1.to_vec();
        bad[10] ^= 1;
        let mut assembly = Assembly::new(manifest.clone());
        assert_eq!(
            assembly.add(0, Bytes::from(bad.clone())),
            Err(BlobError::Corrupt { index: 0 })
        );
        assert!(!assembly.is_complete());
        assert!(!verify(&content_key(&manifest.chunks[0]), &bad));
        assert!(verify(&content_key(&manifest.chunks[0]), &chunks[0].1));
        assert!(verify(b"ordinary key", &bad));
    }

    #[test]
    fn the_id_is_the_manifest_hash_and_parses_back() {
        let (manifest, _) = split(b"hello").unwrap();
        let id = manifest.id();
        assert!(verify(&id.key(), &manifest.encode()));
        assert_eq!(id.to_string().parse::<BlobId>(), Ok(id));
        assert!("xyz".parse::<BlobId>().is_err());
    }

    #[test]
    fn malformed_manifests_are_errors() {
        assert!(Manifest::decode(b"\xff\xff").is_err());
        let lying = Manifest {
            size: 10 * CHUNK_BYTES as u64,
            chunk_bytes: CHUNK_BYTES as u32,
            chunks: vec![[0; 32]],
        };
        assert!(Manifest::decode(&lying.encode()).is_err());
    }
}
