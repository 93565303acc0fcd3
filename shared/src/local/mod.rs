//! A host's local copies of its tenants' credentials: the working copy format ([`working_copy`], [`frames`],
//! [`records`]), the export file ([`export`]), and hydration from the credential store ([`hydrate`]).
//!
//! [`LocalCopies`] is the one handle on them: the data dir and the data key, opening a tenant's copy once so
//! hydration can hand the same open copy on to the engine store.

pub mod export;
mod frames;
pub mod hydrate;
pub mod records;
pub mod working_copy;

use std::path::{Path, PathBuf};

pub use export::{
    ExportError, ExportHeader, export_header, export_snapshot, import_snapshot, read_export_file, write_export_file,
};
pub use hydrate::{HydrateOutcome, Hydrator, Ready};
pub use records::{RecordLoc, RecordReader, ScanItem, Segment};
pub use working_copy::{DEFAULT_COMPACT_FLOOR, WorkingCopy, WorkingCopyError, generation_step, tenant_dir};

use crate::crypto::Cipher;
use crate::domain::TenantId;

/// The working copies under one data dir, sealed with one data key. Cheap to clone.
#[derive(Clone)]
pub struct LocalCopies {
    data_dir: PathBuf,
    cipher: Cipher,
    /// Where the copies' failed writes are reported.
    disk: Option<crate::disk::DiskWatch>,
}

impl std::fmt::Debug for LocalCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCopies").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl LocalCopies {
    /// The copies under `<data_dir>/tenants/`.
    pub fn new(data_dir: impl Into<PathBuf>, cipher: Cipher) -> Self {
        Self { data_dir: data_dir.into(), cipher, disk: None }
    }

    /// The same copies, each reporting its failed writes to `disk` (see [`WorkingCopy::report_to`]).
    pub fn reporting_to(mut self, disk: crate::disk::DiskWatch) -> Self {
        self.disk = Some(disk);
        self
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The data key.
    pub fn cipher(&self) -> &Cipher {
        &self.cipher
    }

    /// Opens `tenant`'s working copy (blocking: reads its file headers).
    pub fn open(&self, tenant: &TenantId) -> Result<WorkingCopy, WorkingCopyError> {
        let mut copy = WorkingCopy::open(&self.data_dir, tenant.clone(), self.cipher.clone())?;
        if let Some(disk) = &self.disk {
            copy.report_to(disk.clone());
        }
        Ok(copy)
    }

    /// [`LocalCopies::open`] off the async workers.
    pub async fn open_async(&self, tenant: &TenantId) -> Result<WorkingCopy, WorkingCopyError> {
        let (this, tenant) = (self.clone(), tenant.clone());
        tokio::task::spawn_blocking(move || this.open(&tenant))
            .await
            .map_err(|e| WorkingCopyError::Io { op: "opening the working copy", source: std::io::Error::other(e) })?
    }

    /// Runs `f` on `tenant`'s freshly opened copy off the async workers.
    pub async fn with_copy<T: Send + 'static>(
        &self,
        tenant: &TenantId,
        f: impl FnOnce(WorkingCopy) -> Result<T, WorkingCopyError> + Send + 'static,
    ) -> Result<T, WorkingCopyError> {
        let (this, tenant) = (self.clone(), tenant.clone());
        tokio::task::spawn_blocking(move || f(this.open(&tenant)?))
            .await
            .map_err(|e| WorkingCopyError::Io { op: "using the working copy", source: std::io::Error::other(e) })?
    }
}
