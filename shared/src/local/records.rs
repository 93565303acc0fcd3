//! What a reader of a working copy holds: where a record lives ([`RecordLoc`]), what a scan yields
//! ([`ScanItem`]), and a [`RecordReader`] that loads one record by location.

use std::fs::File;
use std::path::PathBuf;

use crate::crypto::Cipher;
use crate::domain::{RecordKey, TenantId};

use super::frames::{BASE_FILE, JOURNAL_FILE, open_frame};
use super::working_copy::{WorkingCopyError, io_err};

/// Which file a record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Segment {
    /// The base snapshot file.
    Base,
    /// The journal.
    Journal,
}

/// Where one sealed record frame lives on disk, so a reader can keep only this (12 bytes) in memory and load
/// the value on demand with [`RecordReader::read`]. Valid until the next [`super::WorkingCopy::write_base`] or
/// [`super::WorkingCopy::compact`], which move every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordLoc {
    pub(super) offset: u32,
    pub(super) len: u32,
    pub(super) segment: Segment,
}

impl RecordLoc {
    /// The file the record is in.
    pub fn segment(&self) -> Segment {
        self.segment
    }
}

/// One record met while scanning a working copy, in write order (base first, then journal entries).
#[derive(Debug)]
pub struct ScanItem {
    /// The record.
    pub key: RecordKey,
    /// The value written, or `None` for a deletion.
    pub value: Option<Vec<u8>>,
    /// Where the frame lives (for on-demand reloads of puts).
    pub loc: RecordLoc,
    /// The generation this record belongs to (the base's, or its journal entry's).
    pub generation: u64,
}

/// Reads single records of a working copy by location, without the working copy itself (so readers need not
/// wait for a writer's fsync). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecordReader {
    pub(super) dir: PathBuf,
    pub(super) tenant: TenantId,
    pub(super) cipher: Cipher,
    pub(super) ad: Vec<u8>,
}

impl RecordReader {
    /// Reads the value of `key` at `loc`. `Ok(None)` when the frame there records a deletion. A frame that does
    /// not decrypt or holds another key (a location made stale by a compaction) is `Corrupt`.
    pub fn read(&self, loc: RecordLoc, key: &RecordKey) -> Result<Option<Vec<u8>>, WorkingCopyError> {
        use std::os::unix::fs::FileExt;
        let name = match loc.segment {
            Segment::Base => BASE_FILE,
            Segment::Journal => JOURNAL_FILE,
        };
        let file = File::open(self.dir.join(name)).map_err(io_err("opening a record's file"))?;
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, u64::from(loc.offset)).map_err(io_err("reading a record"))?;
        let (found, value) = open_frame(&self.cipher, &self.ad, &buf)?;
        if &found != key {
            return Err(WorkingCopyError::Corrupt("record location is stale".into()));
        }
        Ok(value)
    }

    /// The tenant this reader belongs to.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
}
