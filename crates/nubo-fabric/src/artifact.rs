//! Artifacts: a service's files, as one blob. An archive (tar, tar.gz or tar.zst, told apart
//! by their first bytes) is unpacked into the instance's working directory, in this process
//! and never by an outside program the service's environment could steer; any other blob is
//! placed there as the file `artifact`.
//!
//! Unpacking keeps to the directory: entries with absolute paths or `..` are refused, only
//! regular files and directories are made (links, devices and fifos are skipped and counted),
//! permissions lose set-user-id and the like and every write bit but the owner's, and the
//! bytes written are bounded, so a small archive cannot fill the disk.

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use tar::EntryType;

/// The file name of an artifact that is no archive.
pub const PLAIN_NAME: &str = "artifact";

/// What an artifact became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpacked {
    /// Copied as the file `artifact`.
    Plain {
        /// Its size.
        bytes: u64,
    },
    /// An archive, unpacked.
    Archive {
        /// Its format: `tar`, `tar.gz` or `tar.zst`.
        format: &'static str,
        /// Files written.
        files: u64,
        /// Bytes written.
        bytes: u64,
        /// Entries left out (links, devices).
        skipped: u64,
    },
}

/// The format of `bytes`, by its first bytes: `tar.gz`, `tar.zst`, `tar`, or `None`.
pub fn archive_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        Some("tar.gz")
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("tar.zst")
    } else if bytes.get(257..262) == Some(b"ustar") {
        Some("tar")
    } else {
        None
    }
}

/// Places `bytes` in `dir` (which must exist): unpacked if it is an archive, as `artifact`
/// otherwise, writing at most `bytes_max` bytes.
pub fn unpack(bytes: &[u8], dir: &Path, bytes_max: u64) -> io::Result<Unpacked> {
    let Some(format) = archive_format(bytes) else {
        if bytes.len() as u64 > bytes_max {
            return Err(too_large(bytes_max));
        }
        let temporary = dir.join(".artifact.partial");
        fs::write(&temporary, bytes)?;
        fs::rename(&temporary, dir.join(PLAIN_NAME))?;
        return Ok(Unpacked::Plain {
            bytes: bytes.len() as u64,
        });
    };
    let reader: Box<dyn Read + '_> = match format {
        "tar.gz" => Box::new(flate2::read::GzDecoder::new(bytes)),
        "tar.zst" => Box::new(zstd::stream::read::Decoder::new(bytes)?),
        _ => Box::new(bytes),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_mask(0o022);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let (mut files, mut written, mut skipped) = (0u64, 0u64, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if !matches!(kind, EntryType::Regular | EntryType::Directory) {
            skipped += 1;
            continue;
        }
        let path = entry.path()?.into_owned();
        if path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the archive names a path outside its directory: {}",
                    path.display()
                ),
            ));
        }
        written = written.saturating_add(entry.size());
        if written > bytes_max {
            return Err(too_large(bytes_max));
        }
        if !entry.unpack_in(dir)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the archive names a path outside its directory: {}",
                    path.display()
                ),
            ));
        }
        files += u64::from(kind == EntryType::Regular);
    }
    Ok(Unpacked::Archive {
        format,
        files,
        bytes: written,
        skipped,
    })
}

fn too_large(bytes_max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the artifact unpacks to more than {bytes_max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8], EntryType)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content, kind) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(*kind);
            header.set_size(content.len() as u64);
            header.set_mode(0o4777);
            if *kind == EntryType::Symlink {
                header
                    .set_link_name(std::str::from_utf8(content).unwrap())
                    .unwrap();
                header.set_size(0);
            }
            // Written raw: the builder's own path checks would refuse the hostile names.
            let name = path.as_bytes();
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            let data: &[u8] = if *kind == EntryType::Symlink {
                &[]
            } else {
                content
            };
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn archives_of_each_format_unpack_in_place() {
        let tar = tar_of(&[
            ("site", b"", EntryType::Directory),
            ("site/index.html", b"v2", EntryType::Regular),
        ]);
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for (bytes, format) in [(&tar, "tar"), (&gz, "tar.gz"), (&zst, "tar.zst")] {
            let dir = tempfile::tempdir().unwrap();
            let unpacked = unpack(bytes, dir.path(), 1 << 20).unwrap();
            assert_eq!(
                unpacked,
                Unpacked::Archive {
                    format,
                    files: 1,
                    bytes: 2,
                    skipped: 0
                }
            );
            assert_eq!(fs::read(dir.path().join("site/index.html")).unwrap(), b"v2");
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("site/index.html"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o7777,
                0o755,
                "no set-user-id, no group or other writes"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            unpack(b"just a file", dir.path(), 100).unwrap(),
            Unpacked::Plain { bytes: 11 }
        );
        assert_eq!(
            fs::read(dir.path().join(PLAIN_NAME)).unwrap(),
            b"just a file"
        );
    }

    #[test]
    fn hostile_archives_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        fs::write(&target, "untouched").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let escape = format!(
            "../{}/victim",
            outside.path().file_name().unwrap().to_str().unwrap()
        );
        for archive in [
            tar_of(&[(&escape, b"pwned", EntryType::Regular)]),
            tar_of(&[(target.to_str().unwrap(), b"pwned", EntryType::Regular)]),
        ] {
            assert!(unpack(&archive, dir.path(), 1 << 20).is_err());
        }
        // A symlink to the outside, then a file through it: the link is never made.
        let link = tar_of(&[
            (
                "output.log",
                target.to_str().unwrap().as_bytes(),
                EntryType::Symlink,
            ),
            ("output.log", b"pwned", EntryType::Regular),
        ]);
        let unpacked = unpack(&link, dir.path(), 1 << 20).unwrap();
        assert!(matches!(unpacked, Unpacked::Archive { skipped: 1, .. }));
        assert!(
            !fs::symlink_metadata(dir.path().join("output.log"))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        // A bomb: more bytes than allowed.
        let big = vec![0u8; 4096];
        let bomb = tar_of(&[
            ("a", &big, EntryType::Regular),
            ("b", &big, EntryType::Regular),
        ]);
        let error = unpack(&bomb, dir.path(), 5000).unwrap_err();
        assert!(
            error.to_string().contains("more than 5000 bytes"),
            "{error}"
        );
    }
}
