//! Secret files and private directories as OpenSSH treats its keys: never through a symlink, never readable by
//! anyone but the owner. A key or token file with a group or other permission bit is refused with the `chmod`
//! that fixes it; a private directory that exists with looser modes is tightened to 0700 (and logged), one that
//! is a symlink is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

/// Why a private file or directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    /// The path is a symlink (or a symlink's target was asked for).
    #[error("{path} is a symbolic link; refusing to follow it (replace it with the file itself)")]
    Symlink { path: String },
    /// Group or others may read or write the file.
    #[error("{path} has mode {mode:04o}, open to group or others; run `chmod 600 {path}`")]
    LooseMode { path: String, mode: u32 },
    /// Not a regular file (or not a directory, for a directory).
    #[error("{path} is not a {want}")]
    WrongKind { path: String, want: &'static str },
    /// The file system said no.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, source: io::Error },
}

impl PrivateFileError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                Self::Symlink { path: path.display().to_string() }
            } else {
                Self::Io { op, path: path.display().to_string(), source }
            }
        }
    }
}

/// Refuses `path` when it is a symlink; an absent path is fine.
pub fn refuse_symlink(path: &Path) -> Result<(), PrivateFileError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(PrivateFileError::Symlink { path: path.display().to_string() })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PrivateFileError::io("inspecting", path)(e)),
    }
}

/// Opens `path` for reading without following a symlink in its last component.
pub fn open_no_follow(path: &Path) -> Result<File, PrivateFileError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(PrivateFileError::io("opening", path))
}

/// Reads a secret file (key, token): a regular file, not a symlink, with no group or other permission bit.
/// `Ok(None)` when it does not exist.
pub fn read_secret_file(path: &Path) -> Result<Option<Vec<u8>>, PrivateFileError> {
    let mut file = match open_no_follow(path) {
        Ok(f) => f,
        Err(PrivateFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata().map_err(PrivateFileError::io("inspecting", path))?;
    if !meta.is_file() {
        return Err(PrivateFileError::WrongKind { path: path.display().to_string(), want: "regular file" });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::LooseMode { path: path.display().to_string(), mode });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(PrivateFileError::io("reading", path))?;
    Ok(Some(bytes))
}

/// Makes `dir` a private directory: created 0700 (with its parents) when absent, tightened to 0700 when it
/// exists with looser modes, refused when it is a symlink or not a directory.
pub fn private_dir(dir: &Path) -> Result<(), PrivateFileError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(PrivateFileError::Symlink { path: dir.display().to_string() }),
        Ok(meta) if !meta.is_dir() => {
            Err(PrivateFileError::WrongKind { path: dir.display().to_string(), want: "directory" })
        }
        Ok(meta) => {
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 != 0 {
                warn!(path = %dir.display(), mode = format!("{mode:04o}"), "tightening a private directory to 0700");
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(PrivateFileError::io("restricting", dir))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(PrivateFileError::io("creating", dir))?;
            // `mode` is masked by the umask; make sure the directory really is private.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(PrivateFileError::io("restricting", dir))
        }
        Err(e) => Err(PrivateFileError::io("inspecting", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, mode: u32) {
        fs::write(path, b"secret").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn secret_files_are_private_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let (ok, loose, link) = (dir.path().join("ok"), dir.path().join("loose"), dir.path().join("link"));
        write(&ok, 0o600);
        write(&loose, 0o644);
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert_eq!(read_secret_file(&ok).unwrap().as_deref(), Some(&b"secret"[..]));
        assert!(read_secret_file(&dir.path().join("absent")).unwrap().is_none());
        let e = read_secret_file(&loose).unwrap_err();
        assert!(matches!(e, PrivateFileError::LooseMode { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "the fix is named: {e}");
        assert!(!e.to_string().contains("secret"), "never the content");
        assert!(matches!(read_secret_file(&link), Err(PrivateFileError::Symlink { .. })));
        assert!(matches!(read_secret_file(dir.path()), Err(PrivateFileError::WrongKind { .. })));
    }

    #[test]
    fn private_dirs_are_created_tightened_or_refused() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        private_dir(&fresh).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        let loose = root.path().join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&loose).unwrap();
        assert_eq!(fs::metadata(&loose).unwrap().mode() & 0o777, 0o700, "tightened");
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(matches!(private_dir(&link), Err(PrivateFileError::Symlink { .. })));
        let file = root.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(private_dir(&file), Err(PrivateFileError::WrongKind { .. })));
    }
}
