//! Key rotation: re-sealing a tenant's stored records under the current data key while hosts keep writing.

use super::*;

/// How re-sealing one tenant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resealed {
    /// Every record was re-sealed under the current key.
    Done {
        /// How many records.
        records: usize,
    },
    /// Every record already was.
    AlreadyCurrent,
    /// Nothing is stored for the tenant.
    Absent,
    /// A host kept committing while this ran; nothing was changed (run it again).
    LostRace,
}

impl FirestoreCredentialStore {
    /// Re-seals every record of `tenant` under the current key: reads the live set (opening what the current or
    /// the previous key sealed) and installs a copy sealed with the current key, with the generation and the
    /// writer's epoch unchanged. The switch is conditional on the meta document being as read, so a host that
    /// commits meanwhile wins and nothing it wrote is lost; this then reads again, and after a few lost races
    /// reports [`Resealed::LostRace`].
    pub async fn reseal(&self, tenant: &TenantId) -> Result<Resealed, StoreError> {
        let current = self.cipher.fingerprint().to_string();
        for attempt in 0..MAX_ATTEMPTS {
            let (meta, docs) = match self.read_consistent(tenant).await {
                Ok(Some(read)) => read,
                Ok(None) => return Ok(Resealed::Absent),
                Err(Attempt::Raced) => {
                    backoff(attempt).await;
                    continue;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            };
            Meta::check_keys(Some(&meta), &self.cipher)?;
            if meta.sealed_by == [current.clone()] {
                return Ok(Resealed::AlreadyCurrent);
            }
            let mut records = Vec::with_capacity(docs.len());
            for doc in &docs {
                let (key, value) = self.open_record(tenant, doc)?;
                let sealed = self.cipher.seal(tenant, &key, &value);
                records.push((key, sealed));
            }
            let installed = self
                .install_set(tenant, Some(&meta), &records, meta.generation, meta.write_epoch, vec![current.clone()])
                .await;
            match installed {
                Ok(()) => return Ok(Resealed::Done { records: records.len() }),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "a writer committed during a re-seal; reading again");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Ok(Resealed::LostRace)
    }

    /// The fingerprints of the keys that sealed the tenant's live records (empty when unknown or nothing is
    /// stored): for tests and operators.
    pub async fn sealed_by(&self, tenant: &TenantId) -> Result<Vec<String>, StoreError> {
        Ok(self.get_meta(tenant).await?.filter(|m| m.set.is_some()).map(|m| m.sealed_by).unwrap_or_default())
    }
}
