//! A test's directories: the data dir (wiped to simulate a fresh container) and the key file beside it.

use std::path::PathBuf;

use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};

/// A temporary root holding `data/` and `secrets/data.key`, removed when dropped.
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
        Self { root: tempfile::tempdir().unwrap() }
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
