//! A test's directories: the data dir (wiped to simulate a fresh container) and the key file beside it.

use std::path::PathBuf;

use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};

/// A temporary root holding `data/` and `secrets/data.key`, removed when dropped (kept, with the hosts' logs,
/// when `WAKEEPER_TEST_KEEP_DIRS` is set: its path is printed).
pub struct Dirs {
    pub root: tempfile::TempDir,
}

impl Default for Dirs {
    fn default() -> Self {
        Self::new()
    }
}

impl Dirs {
    pub fn new() -> Self {
        let mut root = tempfile::tempdir().unwrap();
        if std::env::var_os("WAKEEPER_TEST_KEEP_DIRS").is_some() {
            root.disable_cleanup(true);
            eprintln!("test dirs kept at {}", root.path().display());
        }
        Self { root }
    }
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }
    pub fn key_file(&self) -> PathBuf {
        self.root.path().join("secrets").join("data.key")
    }
    /// The cipher of the key file (created on first use, as the host does).
    pub fn cipher(&self) -> Cipher {
        Cipher::new(&LocalKeyFile::new(self.key_file()).data_key().unwrap())
    }
    /// Two hosts' directories sealing with one data key (in the cloud it comes from one secret).
    pub fn pair_sharing_key() -> (Dirs, Dirs) {
        let (a, b) = (Dirs::new(), Dirs::new());
        let _ = a.cipher();
        std::fs::create_dir_all(b.key_file().parent().unwrap()).unwrap();
        std::fs::copy(a.key_file(), b.key_file()).unwrap();
        (a, b)
    }
    pub fn wipe_data(&self) {
        let _ = std::fs::remove_dir_all(self.data());
    }
}
