//! [`CredentialStore`] on top of the calls: consistent reads, fenced one-commit batches, whole-set replaces.

use super::*;

#[async_trait]
impl CredentialStore for FirestoreCredentialStore {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            // Optimistic first: no lock a cut-off read could leave behind. Overtaken by writers a few times
            // (a tenant written while it is read, which a host holding the lease does not do), lock them out.
            let result = if attempt < OPTIMISTIC_READS {
                self.read_consistent(tenant).await
            } else {
                let transaction = self.begin_transaction().await?;
                let result = self.read_in(tenant, &transaction).await;
                self.rollback(transaction).await;
                result
            };
            match result {
                Ok(Some((meta, docs))) => {
                    Meta::check_keys(Some(&meta), &self.cipher)?;
                    let generation = meta.generation;
                    let mut records = BTreeMap::new();
                    for doc in &docs {
                        let (key, value) = self.open_record(tenant, doc)?;
                        records.insert(key, value);
                    }
                    return Ok(CredentialSnapshot { generation, records });
                }
                Ok(None) => return Err(StoreError::NotFound),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "a writer committed during a snapshot read; reading again");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore snapshot read overtaken by writers {MAX_ATTEMPTS} times")))
    }

    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        Ok(self.get_meta(tenant).await?.filter(|m| m.set.is_some()).map(|m| m.generation))
    }

    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        if batch.changes.len() > MAX_WRITES_PER_COMMIT {
            return Err(StoreError::Invalid(format!(
                "a batch holds at most {MAX_WRITES_PER_COMMIT} changes, not {}",
                batch.changes.len()
            )));
        }
        check_generation(batch.generation)?;
        check_generation(batch.epoch)?;
        // A later change of the same key wins; Firestore takes one write per document per commit.
        let mut latest: BTreeMap<&RecordKey, Option<&[u8]>> = BTreeMap::new();
        for c in &batch.changes {
            latest.insert(&c.key, c.value.as_deref());
        }
        let mut changes: Vec<(RecordKey, Option<Vec<u8>>)> = Vec::with_capacity(latest.len());
        for (key, value) in latest {
            check_key(key)?;
            let sealed = value.map(|v| self.seal(tenant, key, v)).transpose()?;
            changes.push((key.clone(), sealed));
        }

        for attempt in 0..MAX_ATTEMPTS {
            let outcome = if changes.len() < MAX_WRITES_PER_COMMIT {
                let meta = self.get_meta(tenant).await?;
                Meta::fence(meta.as_ref(), batch.epoch)?;
                if Meta::already_applied(meta.as_ref(), batch.epoch, batch.generation) {
                    debug!(tenant = %tenant, generation = batch.generation, "batch already applied");
                    return Ok(());
                }
                Meta::check_keys(meta.as_ref(), &self.cipher)?;
                let before = Meta::successor(meta.as_ref());
                let sealed_by = before.sealed_also_by(self.cipher.fingerprint());
                let set = before.set.clone().unwrap_or_else(new_set_id);
                let mut writes: Vec<Write> = changes
                    .iter()
                    .map(|(k, v)| match v {
                        Some(sealed) => self.record_write(tenant, &set, k, sealed, batch.generation),
                        None => self.record_delete(tenant, &set, k),
                    })
                    .collect();
                let after = Meta {
                    generation: batch.generation,
                    write_epoch: batch.epoch,
                    max_epoch: before.max_epoch.max(batch.epoch),
                    set: Some(set),
                    sealed_by,
                    ..before
                };
                writes.push(self.meta_write(tenant, meta.as_ref(), &after));
                self.commit(writes).await.map(|_| ())
            } else {
                // 500 distinct records plus the meta document do not fit one commit: rebuild the set from
                // the stored (still sealed) records with the changes applied, and switch to it at once.
                // The switch to the rebuilt set is conditional on this meta document, so records read
                // here that change before the switch make it fail and the whole batch is retried.
                let meta = self.get_meta(tenant).await?;
                Meta::fence(meta.as_ref(), batch.epoch)?;
                let live = meta.as_ref().filter(|m| m.set.is_some());
                if Meta::already_applied(meta.as_ref(), batch.epoch, batch.generation) {
                    return Ok(());
                }
                Meta::check_keys(meta.as_ref(), &self.cipher)?;
                let mut records: BTreeMap<RecordKey, Vec<u8>> = BTreeMap::new();
                if let Some(set) = live.and_then(|m| m.set.as_deref()) {
                    for doc in self.list_set(tenant, set, false).await? {
                        let (key, sealed) = raw_record(&doc)?;
                        records.insert(key, sealed.to_vec());
                    }
                }
                for (k, v) in &changes {
                    match v {
                        Some(sealed) => records.insert(k.clone(), sealed.clone()),
                        None => records.remove(k),
                    };
                }
                let records: Vec<_> = records.into_iter().collect();
                let sealed_by = Meta::successor(meta.as_ref()).sealed_also_by(self.cipher.fingerprint());
                self.install_set(tenant, meta.as_ref(), &records, batch.generation, batch.epoch, sealed_by).await
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "firestore write raced; retrying");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore write kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        check_generation(snapshot.generation)?;
        check_generation(epoch)?;
        let records = snapshot
            .records
            .iter()
            .map(|(k, v)| Ok((k.clone(), self.seal(tenant, k, v)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        for attempt in 0..MAX_ATTEMPTS {
            let meta = self.get_meta(tenant).await?;
            Meta::fence(meta.as_ref(), epoch)?;
            Meta::check_keys(meta.as_ref(), &self.cipher)?;
            let sealed_by = vec![self.cipher.fingerprint().to_string()];
            match self.install_set(tenant, meta.as_ref(), &records, snapshot.generation, epoch, sealed_by).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "firestore replace raced; retrying");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore replace kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn claim(&self, tenant: &TenantId, epoch: u64) -> Result<Option<StoredAt>, StoreError> {
        check_generation(epoch)?;
        for attempt in 0..MAX_ATTEMPTS {
            let meta = self.get_meta(tenant).await?;
            Meta::fence(meta.as_ref(), epoch)?;
            // A host with the wrong key takes nothing: not even the fence, which would stop the right one.
            Meta::check_keys(meta.as_ref(), &self.cipher)?;
            let stood = meta
                .as_ref()
                .filter(|m| m.set.is_some())
                .map(|m| StoredAt { epoch: m.write_epoch, generation: m.generation });
            if meta.as_ref().is_some_and(|m| m.max_epoch == epoch) {
                return Ok(stood);
            }
            // A tenant with nothing stored gets a tombstone that carries the fence.
            let claimed = Meta { max_epoch: epoch, ..Meta::successor(meta.as_ref()) };
            match self.commit(vec![self.meta_write(tenant, meta.as_ref(), &claimed)]).await {
                Ok(_) => return Ok(stood),
                Err(Attempt::Raced) => backoff(attempt).await,
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore claim kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), StoreError> {
        check_generation(epoch)?;
        for attempt in 0..MAX_ATTEMPTS {
            let meta = self.get_meta(tenant).await?;
            Meta::fence(meta.as_ref(), epoch)?;
            let Some(meta) = meta else { return Ok(()) };
            if meta.set.is_none() && meta.max_epoch >= epoch {
                // Already a tombstone; finish collecting what an earlier delete left.
                self.try_collect_garbage(tenant).await?;
                return Ok(());
            }
            // A tombstone keeps the fence, so a stale writer cannot bring the tenant back.
            let mut tombstone = Meta {
                generation: 0,
                write_epoch: 0,
                max_epoch: meta.max_epoch.max(epoch),
                set: None,
                sealed_by: Vec::new(),
                ..meta.clone()
            };
            tombstone.garbage.extend(meta.set.clone());
            match self.commit(vec![self.meta_write(tenant, Some(&meta), &tombstone)]).await {
                Ok(_) => {
                    // The tenant reads as absent from here on; removing its records is housekeeping, but a
                    // logout should not leave them behind, so report a failure to the caller for a retry.
                    return self.try_collect_garbage(tenant).await;
                }
                Err(Attempt::Raced) => backoff(attempt).await,
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore delete kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let mut tenants = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = ListDocumentsRequest {
                parent: self.db.get_documents_path().clone(),
                collection_id: self.tenants_collection.clone(),
                page_size: PAGE_SIZE,
                page_token: std::mem::take(&mut page_token),
                mask: Some(DocumentMask { field_paths: vec!["set".into()] }),
                ..Default::default()
            };
            let mut client = self.db.client().get();
            let resp = self
                .call("list tenants", client.list_documents(req))
                .await?
                .map_err(|s| map_status("list tenants", s))?
                .into_inner();
            for doc in resp.documents {
                if !doc.fields.contains_key("set") {
                    continue; // a tombstone
                }
                let id = doc.name.rsplit('/').next().unwrap_or_default();
                match TenantId::parse(id) {
                    Ok(t) => tenants.push(t),
                    Err(e) => warn!(error = %e, "skipping a firestore tenant document with an invalid id"),
                }
            }
            if resp.next_page_token.is_empty() {
                return Ok(tenants);
            }
            page_token = resp.next_page_token;
        }
    }
}
