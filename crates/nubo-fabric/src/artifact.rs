//! Artifacts: a service's files, as one blob. An archive (tar, tar.gz or tar.zst, told apart
//! by their first bytes) is unpacked into the instance's working directory, in this process
//! and never by an outside program the service's environment could steer; any other blob is
//! placed there as the file `artifact`.
//!
//! Unpacking keeps to the directory, and refuses the whole archive, naming the entry, for:
//! a path that is absolute or climbs out with `..`; a symbolic or hard link whose target is
//! absolute or climbs out; a device or a fifo; an entry (a sparse one counts its full size)
//! or a total past the bytes allowed. Permissions lose set-user-id and the like and every
//! write bit but the owner's.

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
    let (mut files, mut written) = (0u64, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let path = entry.path()?.into_owned();
        let refuse = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the archive's entry {} {why}", path.display()),
            )
        };
        if escapes(&path) {
            return Err(refuse("lies outside the directory"));
        }
        match kind {
            EntryType::Regular | EntryType::Directory | EntryType::GNUSparse => {}
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| refuse("is a link without a target"))?
                    .into_owned();
                // A symbolic link's target is relative to the link's own directory.
                let resolved = match kind {
                    EntryType::Symlink => path.parent().unwrap_or(Path::new("")).join(&target),
                    _ => target.clone(),
                };
                if target.is_absolute() || escapes(&resolved) {
                    return Err(refuse(&format!(
                        "links to {}, outside the directory",
                        target.display()
                    )));
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(refuse("is a device or a fifo"));
            }
            other => return Err(refuse(&format!("is of a kind not unpacked ({other:?})"))),
        }
        let size = entry.header().size()?;
        if size > bytes_max {
            return Err(refuse(&format!(
                "is {size} bytes, past the {bytes_max} bytes allowed"
            )));
        }
        written = written.saturating_add(size);
        if written > bytes_max {
            return Err(refuse(&format!(
                "makes the archive unpack to more than {bytes_max} bytes"
            )));
        }
        if !entry.unpack_in(dir)? {
            return Err(refuse("lies outside the directory"));
        }
        files += u64::from(kind == EntryType::Regular);
    }
    Ok(Unpacked::Archive {
        format,
        files,
        bytes: written,
    })
}

/// Whether a relative path climbs above its start (or is absolute).
fn escapes(path: &Path) -> bool {
    if path.is_absolute() {
        return true;
    }
    let mut depth: i64 = 0;
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::CurDir => {}
            _ => return true,
        }
        if depth < 0 {
            return true;
        }
    }
    false
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
            let link = matches!(*kind, EntryType::Symlink | EntryType::Link);
            if link {
                header
                    .set_link_name(std::str::from_utf8(content).unwrap())
                    .unwrap();
                header.set_size(0);
            }
            // Written raw: the builder's own path checks would refuse the hostile names.
            let name = path.as_bytes();
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            let data: &[u8] = if link { &[] } else { content };
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
    fn hostile_archives_are_refused_naming_the_entry_and_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        fs::write(&target, "untouched").unwrap();
        let escape = format!(
            "../{}/victim",
            outside.path().file_name().unwrap().to_str().unwrap()
        );
        let target_text = target.to_str().unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_of(&[(&escape, b"pwned", EntryType::Regular)]),
                "lies outside",
            ),
            (
                tar_of(&[(target_text, b"pwned", EntryType::Regular)]),
                "lies outside",
            ),
            (
                tar_of(&[
                    ("output.log", target_text.as_bytes(), EntryType::Symlink),
                    ("output.log", b"pwned", EntryType::Regular),
                ]),
                "links to",
            ),
            (
                tar_of(&[("up", b"../../etc", EntryType::Symlink)]),
                "links to ../../etc",
            ),
            (
                tar_of(&[("passwd", b"/etc/passwd", EntryType::Link)]),
                "links to /etc/passwd",
            ),
            (
                tar_of(&[("pipe", b"", EntryType::Fifo)]),
                "device or a fifo",
            ),
            (tar_of(&[("tty", b"", EntryType::Char)]), "device or a fifo"),
        ];
        for (archive, why) in cases {
            let dir = tempfile::tempdir().unwrap();
            let error = unpack(&archive, dir.path(), 1 << 20).unwrap_err();
            assert!(error.to_string().contains(why), "{error} (wanted {why})");
            assert!(error.to_string().contains("entry "), "{error}");
        }
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
        // A link that stays inside is fine.
        let dir = tempfile::tempdir().unwrap();
        let inside = tar_of(&[
            ("site", b"", EntryType::Directory),
            ("site/index.html", b"hi", EntryType::Regular),
            ("index.html", b"site/index.html", EntryType::Symlink),
        ]);
        unpack(&inside, dir.path(), 1 << 20).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("index.html")).unwrap(),
            "hi"
        );
        // A 10 GiB entry (as a sparse file's header says) in a 100 MiB budget, and a bomb of
        // small entries past it.
        let mut header = tar::Header::new_ustar();
        header.set_path("huge").unwrap();
        header.set_size(10 << 30);
        header.set_entry_type(EntryType::Regular);
        header.set_cksum();
        let mut huge = header.as_bytes().to_vec();
        huge.extend(vec![0u8; 1024]);
        let error = unpack(&huge, dir.path(), 100 << 20).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("entry huge is 10737418240 bytes"),
            "{error}"
        );
        assert!(!dir.path().join("huge").exists());
        let big = vec![0u8; 4096];
        let bomb = tar_of(&[
            ("a", &big, EntryType::Regular),
            ("b", &big, EntryType::Regular),
        ]);
        let error = unpack(&bomb, dir.path(), 5000).unwrap_err();
        assert!(error.to_string().contains("entry b makes"), "{error}");
    }
}
