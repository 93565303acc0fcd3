//! [`CredentialStore`] on the embedded store: snapshots as range scans, fenced atomic batches.

use super::*;

/// The key range holding every record of `tenant`. Tenant ids never contain NUL, so nothing sorts between
/// `tenant` and `tenant + "\0"` except `tenant` itself.
pub(super) fn tenant_bounds(tenant: &TenantId) -> (String, String) {
    (tenant.as_str().to_owned(), format!("{}\0", tenant.as_str()))
}

pub(super) fn read_snapshot(inner: &Inner, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
    let db = inner.db.get().map_err(db_err)?;
    let txn = db.begin_read().map_err(db_err)?;
    let generations = txn.open_table(GENERATIONS).map_err(db_err)?;
    let Some(generation) = generations.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value()) else {
        return Err(StoreError::NotFound);
    };
    let credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
    let (lo, hi) = tenant_bounds(tenant);
    let mut records = BTreeMap::new();
    for entry in credentials.range((lo.as_str(), "", "")..(hi.as_str(), "", "")).map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let (_, kind, key) = k.value();
        let kind = RecordKind::parse(kind)
            .ok_or_else(|| StoreError::Corrupt("a stored credential record has an unknown kind".into()))?;
        let record_key = RecordKey::new(kind, key);
        let plain = inner.cipher.open(tenant, &record_key, v.value()).map_err(|_| {
            StoreError::Corrupt(format!("stored {} record does not decrypt (altered or moved)", kind.as_str()))
        })?;
        records.insert(record_key, plain);
    }
    Ok(CredentialSnapshot { generation, records })
}

/// Refuses `epoch` if the tenant's fence is newer; otherwise returns the fence.
pub(super) fn check_fence(txn: &WriteTransaction, tenant: &TenantId, epoch: u64) -> Result<u64, StoreError> {
    let epochs = txn.open_table(EPOCHS).map_err(db_err)?;
    let current = epochs.get(tenant.as_str()).map_err(db_err)?.map_or(0, |e| e.value());
    if epoch < current {
        return Err(StoreError::Conflict(Conflict::StaleEpoch { presented: epoch, current }));
    }
    Ok(current)
}

pub(super) fn advance_fence(
    txn: &WriteTransaction,
    tenant: &TenantId,
    epoch: u64,
    current: u64,
) -> Result<(), StoreError> {
    if epoch > current {
        txn.open_table(EPOCHS).map_err(db_err)?.insert(tenant.as_str(), epoch).map_err(db_err)?;
    }
    Ok(())
}

pub(super) fn apply_sealed(
    credentials: &mut Table<'_, (&'static str, &'static str, &'static str), &'static [u8]>,
    tenant: &TenantId,
    changes: &[SealedChange],
) -> Result<(), StoreError> {
    for c in changes {
        let row = (tenant.as_str(), c.kind.as_str(), c.key.as_str());
        match &c.sealed {
            Some(sealed) => {
                credentials.insert(row, sealed.as_slice()).map_err(db_err)?;
            }
            None => {
                credentials.remove(row).map_err(db_err)?;
            }
        }
    }
    Ok(())
}

pub(super) fn remove_all_records(
    credentials: &mut Table<'_, (&'static str, &'static str, &'static str), &'static [u8]>,
    tenant: &TenantId,
) -> Result<(), StoreError> {
    let (lo, hi) = tenant_bounds(tenant);
    credentials.retain_in((lo.as_str(), "", "")..(hi.as_str(), "", ""), |_, _| false).map_err(db_err)
}

#[async_trait]
impl CredentialStore for EmbeddedStore {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        let tenant = tenant.clone();
        self.blocking(move |inner| read_snapshot(inner, &tenant)).await
    }

    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let db = inner.db.get().map_err(db_err)?;
            let txn = db.begin_read().map_err(db_err)?;
            let generations = txn.open_table(GENERATIONS).map_err(db_err)?;
            Ok(generations.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value()))
        })
        .await
    }

    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        if batch.changes.len() > MAX_WRITES_PER_COMMIT {
            return Err(StoreError::Invalid(format!(
                "a batch carries {} changes, more than {MAX_WRITES_PER_COMMIT}",
                batch.changes.len()
            )));
        }
        let changes = self.seal_changes(tenant, batch.changes.iter().map(|c| (&c.key, c.value.as_deref())))?;
        let (tenant, generation, epoch) = (tenant.clone(), batch.generation, batch.epoch);
        self.write(move |txn| {
            let fence = check_fence(txn, &tenant, epoch)?;
            {
                let mut generations = txn.open_table(GENERATIONS).map_err(db_err)?;
                let mut write_epochs = txn.open_table(WRITE_EPOCHS).map_err(db_err)?;
                let stored = generations.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value());
                let stored_epoch = write_epochs.get(tenant.as_str()).map_err(db_err)?.map_or(0, |e| e.value());
                if stored.is_some_and(|stored| stored_epoch == epoch && generation <= stored) {
                    // Already applied: the same writer's retry after a lost acknowledgement.
                    return Ok(((), false));
                }
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                apply_sealed(&mut credentials, &tenant, &changes)?;
                generations.insert(tenant.as_str(), generation).map_err(db_err)?;
                write_epochs.insert(tenant.as_str(), epoch).map_err(db_err)?;
            }
            advance_fence(txn, &tenant, epoch, fence)?;
            Ok(((), true))
        })
        .await
    }

    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        let records = self.seal_changes(tenant, snapshot.records.iter().map(|(k, v)| (k, Some(v.as_slice()))))?;
        let (tenant, generation) = (tenant.clone(), snapshot.generation);
        self.write(move |txn| {
            let fence = check_fence(txn, &tenant, epoch)?;
            {
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                remove_all_records(&mut credentials, &tenant)?;
                apply_sealed(&mut credentials, &tenant, &records)?;
                let mut generations = txn.open_table(GENERATIONS).map_err(db_err)?;
                generations.insert(tenant.as_str(), generation).map_err(db_err)?;
                txn.open_table(WRITE_EPOCHS).map_err(db_err)?.insert(tenant.as_str(), epoch).map_err(db_err)?;
            }
            advance_fence(txn, &tenant, epoch, fence)?;
            Ok(((), true))
        })
        .await
    }

    async fn claim(&self, tenant: &TenantId, epoch: u64) -> Result<Option<StoredAt>, StoreError> {
        let tenant = tenant.clone();
        self.write(move |txn| {
            let fence = check_fence(txn, &tenant, epoch)?;
            let generation =
                txn.open_table(GENERATIONS).map_err(db_err)?.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value());
            let written_by = txn
                .open_table(WRITE_EPOCHS)
                .map_err(db_err)?
                .get(tenant.as_str())
                .map_err(db_err)?
                .map_or(0, |e| e.value());
            advance_fence(txn, &tenant, epoch, fence)?;
            Ok((generation.map(|generation| StoredAt { epoch: written_by, generation }), epoch > fence))
        })
        .await
    }

    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), StoreError> {
        let tenant = tenant.clone();
        self.write(move |txn| {
            // The fence stays behind, so no writer older than the deleting one brings the tenant back.
            let fence = check_fence(txn, &tenant, epoch)?;
            let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
            remove_all_records(&mut credentials, &tenant)?;
            txn.open_table(GENERATIONS).map_err(db_err)?.remove(tenant.as_str()).map_err(db_err)?;
            txn.open_table(WRITE_EPOCHS).map_err(db_err)?.remove(tenant.as_str()).map_err(db_err)?;
            drop(credentials);
            advance_fence(txn, &tenant, epoch, fence)?;
            Ok(((), true))
        })
        .await
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.blocking(|inner| {
            let db = inner.db.get().map_err(db_err)?;
            let txn = db.begin_read().map_err(db_err)?;
            let generations = txn.open_table(GENERATIONS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in generations.iter().map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                if let Some(id) = stored_id(k.value(), "credential_generations") {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
    }
}
