//! [`TenantStore`] on the embedded store: tenant records, the desired index, compare-and-set leases.

use super::*;

/// Validates a tenant id read from disk: a file edited by hand or written by a buggy version must not
/// smuggle a bad id into paths and keys, nor stop the other tenants from being listed.
pub(super) fn stored_id(raw: &str, table: &'static str) -> Option<TenantId> {
    match TenantId::parse(raw) {
        Ok(id) => Some(id),
        Err(e) => {
            warn!(table, stored_id = ?raw, error = %e, "skipping a stored tenant id that fails validation");
            None
        }
    }
}

pub(super) fn decode_tenant(tenant: &TenantId, bytes: &[u8]) -> Result<TenantRecord, StoreError> {
    let record: TenantRecord = serde_json::from_slice(bytes)
        // serde's message may quote stored text; position and category are enough to find the row's fault.
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "tenant record does not decode ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
    if record.tenant_id != *tenant {
        return Err(StoreError::Corrupt("tenant record is stored under another tenant's id".into()));
    }
    Ok(record)
}

pub(super) fn put_tenant(
    tenants: &mut Table<'_, &'static str, &'static [u8]>,
    desired: &mut Table<'_, &'static str, ()>,
    record: &TenantRecord,
) -> Result<(), StoreError> {
    let id = record.tenant_id.as_str();
    let json = serde_json::to_vec(record).expect("a tenant record serializes");
    tenants.insert(id, json.as_slice()).map_err(db_err)?;
    if record.whatsapp_connected {
        desired.insert(id, ()).map_err(db_err)?;
    } else {
        desired.remove(id).map_err(db_err)?;
    }
    Ok(())
}

/// A record for a tenant the table has not seen, created by an operation other than `set_desired`.
pub(super) fn blank_record(tenant: &TenantId) -> TenantRecord {
    TenantRecord { whatsapp_connected: false, ..TenantRecord::desired(tenant.clone()) }
}

pub(super) fn expiry(now: UnixMillis, ttl_ms: u64) -> UnixMillis {
    now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

#[async_trait]
impl TenantStore for EmbeddedStore {
    async fn list_desired(&self, page_token: Option<String>, limit: usize) -> Result<Page<TenantRecord>, StoreError> {
        // The token is the last tenant id of the previous page; anything else is a forged or garbled token.
        let after = match page_token {
            Some(token) => {
                Some(TenantId::parse(&token).map_err(|_| StoreError::Invalid("malformed page token".into()))?)
            }
            None => None,
        };
        let limit = limit.max(1);
        self.blocking(move |inner| {
            let db = inner.db.get().map_err(db_err)?;
            let txn = db.begin_read().map_err(db_err)?;
            let desired = txn.open_table(DESIRED).map_err(db_err)?;
            let tenants = txn.open_table(TENANTS).map_err(db_err)?;
            let lower = match &after {
                Some(id) => Bound::Excluded(id.as_str()),
                None => Bound::Unbounded,
            };
            let mut rows = desired.range::<&str>((lower, Bound::Unbounded)).map_err(db_err)?;
            let mut items = Vec::new();
            let mut next = None;
            while let Some(entry) = rows.next() {
                let (k, _) = entry.map_err(db_err)?;
                let Some(id) = stored_id(k.value(), "desired_tenants") else { continue };
                let record = match tenants.get(id.as_str()).map_err(db_err)? {
                    Some(v) => decode_tenant(&id, v.value()),
                    None => Err(StoreError::Corrupt("desired index names a tenant with no record".into())),
                };
                match record {
                    Ok(r) if r.whatsapp_connected => items.push(r),
                    Ok(_) => warn!(tenant = %id, "desired index names a tenant whose flag is off; skipping"),
                    // One bad row must not keep every other tenant from being restored.
                    Err(e) => warn!(tenant = %id, error = %e, "skipping an unreadable tenant record"),
                }
                if items.len() == limit {
                    if rows.next().is_some() {
                        next = Some(id.as_str().to_owned());
                    }
                    break;
                }
            }
            Ok(Page { items, next })
        })
        .await
    }

    async fn get(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let db = inner.db.get().map_err(db_err)?;
            let txn = db.begin_read().map_err(db_err)?;
            let tenants = txn.open_table(TENANTS).map_err(db_err)?;
            match tenants.get(tenant.as_str()).map_err(db_err)? {
                Some(v) => Ok(Some(decode_tenant(&tenant, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn set_desired(&self, tenant: &TenantId, desired: bool) -> Result<(), StoreError> {
        let fresh = blank_record(tenant);
        self.update_tenant(tenant, move |stored| {
            let mut record = stored.unwrap_or(fresh);
            record.whatsapp_connected = desired;
            Ok((Some(record), ()))
        })
        .await
    }

    async fn write_status(
        &self,
        tenant: &TenantId,
        update: &StatusUpdate,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        self.status_write(tenant, None, update, now).await
    }

    async fn write_status_as_holder(
        &self,
        tenant: &TenantId,
        holder: &Lease,
        update: &StatusUpdate,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        self.status_write(tenant, Some(holder.clone()), update, now).await
    }

    async fn record_failure(&self, tenant: &TenantId) -> Result<u32, StoreError> {
        let fresh = blank_record(tenant);
        self.update_tenant(tenant, move |stored| {
            let mut record = stored.unwrap_or(fresh);
            record.consecutive_failures = record.consecutive_failures.saturating_add(1);
            let count = record.consecutive_failures;
            Ok((Some(record), count))
        })
        .await
    }

    async fn reset_failures(&self, tenant: &TenantId, now: UnixMillis) -> Result<bool, StoreError> {
        self.update_tenant(tenant, move |stored| match stored {
            Some(mut record) if record.consecutive_failures > 0 => {
                record.consecutive_failures = 0;
                record.last_healthy_at = Some(now);
                Ok((Some(record), true))
            }
            _ => Ok((None, false)),
        })
        .await
    }

    async fn acquire_lease(
        &self,
        tenant: &TenantId,
        owner: &str,
        stale: Option<&Lease>,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        let fresh = blank_record(tenant);
        let owner = owner.to_owned();
        let stale = stale.cloned();
        self.update_tenant(tenant, move |stored| {
            let mut record = stored.unwrap_or(fresh);
            let (epoch, version) = match &record.lease {
                Some(held) if held.owner == owner || held.is_released() || stale.as_ref() == Some(held) => {
                    (held.epoch, held.version)
                }
                Some(held) => return Err(StoreError::Conflict(Conflict::LeaseHeld { holder: held.clone() })),
                None => (0, 0),
            };
            let lease = Lease { owner, epoch: epoch + 1, version: version + 1, expires_at: expiry(now, ttl_ms) };
            record.lease = Some(lease.clone());
            Ok((Some(record), lease))
        })
        .await
    }

    async fn renew_lease(
        &self,
        tenant: &TenantId,
        lease: &Lease,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        let presented = lease.clone();
        self.update_tenant(tenant, move |stored| {
            let Some(mut record) = stored else {
                return Err(StoreError::Conflict(Conflict::LeaseLost));
            };
            let renewed = match &record.lease {
                Some(held) if held.same_holding(&presented) && !held.is_released() => {
                    Lease { version: held.version + 1, expires_at: expiry(now, ttl_ms), ..presented }
                }
                _ => return Err(StoreError::Conflict(Conflict::LeaseLost)),
            };
            record.lease = Some(renewed.clone());
            Ok((Some(record), renewed))
        })
        .await
    }

    async fn release_lease(&self, tenant: &TenantId, lease: &Lease) -> Result<(), StoreError> {
        let presented = lease.clone();
        self.update_tenant(tenant, move |stored| match stored {
            Some(mut record)
                if record.lease.as_ref().is_some_and(|held| held.same_holding(&presented) && !held.is_released()) =>
            {
                if let Some(held) = record.lease.as_mut() {
                    held.expires_at = 0;
                }
                Ok((Some(record), ()))
            }
            _ => Ok((None, ())),
        })
        .await
    }
}

impl EmbeddedStore {
    /// A status write, when `holder` is given only while the stored lease is still that holding.
    async fn status_write(
        &self,
        tenant: &TenantId,
        holder: Option<Lease>,
        update: &StatusUpdate,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let fresh = blank_record(tenant);
        let update = update.clone();
        self.update_tenant(tenant, move |stored| {
            if let Some(holder) = &holder
                && !stored.as_ref().and_then(|r| r.lease.as_ref()).is_some_and(|l| l.same_holding(holder))
            {
                return Err(StoreError::Conflict(Conflict::LeaseLost));
            }
            let mut record = match stored {
                Some(r) if !r.differs_from(&update) => return Ok((None, false)),
                Some(r) => r,
                None => fresh,
            };
            if record.status != Some(update.status) {
                record.status_changed_at = Some(now);
            }
            if update.status == TenantStatus::Connected {
                record.last_healthy_at = Some(now);
            }
            record.status = Some(update.status);
            record.reason = update.reason;
            record.whatsapp_connected = update.whatsapp_connected;
            Ok((Some(record), true))
        })
        .await
    }
}
