//! The Firestore calls the store is built from: documents, transactions, commits, record sets, garbage
//! collection, sealing.

use super::*;

impl FirestoreCredentialStore {
    /// Runs one Firestore call under the store's timeout.
    pub(super) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, Status>>,
    ) -> Result<Result<T, Status>, StoreError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| StoreError::Unavailable(format!("firestore {op}: timed out after {:?}", self.timeout)))
    }

    /// The meta document, read strongly (the newest committed version).
    pub(super) async fn get_meta(&self, tenant: &TenantId) -> Result<Option<Meta>, StoreError> {
        let req = GetDocumentRequest { name: self.meta_name(tenant), ..Default::default() };
        let mut client = self.db.client().get();
        match self.call("get meta", client.get_document(req)).await? {
            Ok(resp) => parse_meta(&resp.into_inner()).map(Some),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(map_status("get meta", s)),
        }
    }

    /// Every document of a record set as it is now, page by page. Not a snapshot by itself: callers check
    /// the meta document did not move meanwhile (see `read`) or commit under a precondition on it. Pages are
    /// bounded by count; a page whose answer outgrows the client's message limit (large records) is asked
    /// again at half the size, down to one document, which always fits (records are at most
    /// [`MAX_RECORD_VALUE_LEN`]).
    pub(super) async fn list_set(
        &self,
        tenant: &TenantId,
        set: &str,
        names_only: bool,
    ) -> Result<Vec<Document>, StoreError> {
        let mut docs = Vec::new();
        let mut page_token = String::new();
        let mut page_size = PAGE_SIZE;
        loop {
            let req = ListDocumentsRequest {
                parent: self.meta_name(tenant),
                collection_id: set_collection(set),
                page_size,
                page_token: page_token.clone(),
                // An empty mask returns names only.
                mask: names_only.then(DocumentMask::default),
                ..Default::default()
            };
            let mut client = self.db.client().get().max_decoding_message_size(MAX_MESSAGE_LEN);
            let resp = match self.call("list records", client.list_documents(req)).await? {
                Ok(resp) => resp.into_inner(),
                Err(s) if page_too_large(&s) && page_size > 1 => {
                    page_size = (page_size / 2).max(1);
                    debug!(%tenant, page_size, "a page of records outgrew the message limit; asking for fewer");
                    continue;
                }
                Err(s) => return Err(map_status("list records", s)),
            };
            docs.extend(resp.documents);
            if resp.next_page_token.is_empty() {
                return Ok(docs);
            }
            page_token = resp.next_page_token;
        }
    }

    /// Starts a read-write transaction. A `read` overtaken by writers uses one for its locks, not its writes:
    /// the meta document it reads stays locked until the transaction ends, and every commit that changes the
    /// live set writes the meta document, so no such commit lands while the pages are read. (A read-only
    /// transaction or a read time would do on Firestore itself, but the emulator serves later pages at the
    /// current time whatever they say; the locks behave alike on both.)
    pub(super) async fn begin_transaction(&self) -> Result<Vec<u8>, StoreError> {
        let req = BeginTransactionRequest {
            database: self.database(),
            options: Some(TransactionOptions {
                mode: Some(transaction_options::Mode::ReadWrite(transaction_options::ReadWrite::default())),
            }),
            ..Default::default()
        };
        let mut client = self.db.client().get();
        Ok(self
            .call("begin transaction", client.begin_transaction(req))
            .await?
            .map_err(|s| map_status("begin transaction", s))?
            .into_inner()
            .transaction)
    }

    /// Ends a transaction that wrote nothing. Best effort: an unfinished transaction expires on its own.
    pub(super) async fn rollback(&self, transaction: Vec<u8>) {
        let req = RollbackRequest { database: self.database(), transaction, ..Default::default() };
        let mut client = self.db.client().get();
        if let Ok(Err(s)) = self.call("rollback", client.rollback(req)).await {
            debug!(code = ?s.code(), "firestore rollback failed; the transaction will expire");
        }
    }

    /// The generation and the live set's documents, read inside `transaction`; `None` when nothing is stored.
    pub(super) async fn read_in(
        &self,
        tenant: &TenantId,
        transaction: &[u8],
    ) -> Result<Option<(Meta, Vec<Document>)>, Attempt> {
        let req = GetDocumentRequest {
            name: self.meta_name(tenant),
            consistency_selector: Some(get_document_request::ConsistencySelector::Transaction(transaction.to_vec())),
            ..Default::default()
        };
        let mut client = self.db.client().get();
        let meta = match self.call("get meta", client.get_document(req)).await? {
            Ok(resp) => parse_meta(&resp.into_inner())?,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(transaction_status("get meta", s)),
        };
        let Some(set) = &meta.set else { return Ok(None) };
        // Plain strong reads: while the transaction holds the meta document, no commit changes the set.
        let docs = self.list_set(tenant, set, false).await?;
        Ok(Some((meta, docs)))
    }

    /// The generation and the live set's documents as one snapshot; `None` when nothing is stored. A writer
    /// that commits between the two reads of the meta document makes this a lost race (read again).
    pub(super) async fn read_consistent(&self, tenant: &TenantId) -> Result<Option<(Meta, Vec<Document>)>, Attempt> {
        let Some(before) = self.get_meta(tenant).await? else { return Ok(None) };
        let Some(set) = &before.set else { return Ok(None) };
        let docs = self.list_set(tenant, set, false).await?;
        let after = self.get_meta(tenant).await?;
        if after.map(|m| m.update_time) != Some(before.update_time) {
            return Err(Attempt::Raced);
        }
        Ok(Some((before, docs)))
    }

    /// Applies `writes` atomically. A failed precondition is a lost race, not an error.
    pub(super) async fn commit(&self, writes: Vec<Write>) -> Result<Vec<pb::WriteResult>, Attempt> {
        debug_assert!(writes.len() <= MAX_WRITES_PER_COMMIT);
        let req = CommitRequest { database: self.database(), writes, ..Default::default() };
        let mut client = self.db.client().get();
        match self.call("commit", client.commit(req)).await? {
            Ok(resp) => Ok(resp.into_inner().write_results),
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted) => {
                Err(Attempt::Raced)
            }
            Err(s) => Err(Attempt::Failed(map_status("commit", s))),
        }
    }

    // ---- writes --------------------------------------------------------------------------------------------

    /// The meta document as a write: every field of `next` set, guarded by `base` being unchanged.
    pub(super) fn meta_write(&self, tenant: &TenantId, base: Option<&Meta>, next: &Meta) -> Write {
        let mut fields = HashMap::from([
            ("generation".to_string(), int_value(next.generation)),
            ("write_epoch".to_string(), int_value(next.write_epoch)),
            ("max_epoch".to_string(), int_value(next.max_epoch)),
            ("garbage".to_string(), string_array(&next.garbage)),
            ("sealed_by".to_string(), string_array(&next.sealed_by)),
        ]);
        if let Some(set) = &next.set {
            fields.insert("set".into(), string_value(set));
        }
        Write {
            operation: Some(write::Operation::Update(Document {
                name: self.meta_name(tenant),
                fields,
                ..Default::default()
            })),
            current_document: Some(Meta::precondition(base)),
            ..Default::default()
        }
    }

    pub(super) fn record_write(
        &self,
        tenant: &TenantId,
        set: &str,
        key: &RecordKey,
        sealed: &[u8],
        generation: u64,
    ) -> Write {
        let fields = HashMap::from([
            ("kind".to_string(), string_value(key.kind.as_str())),
            ("key".to_string(), string_value(&key.key)),
            ("value".to_string(), Value { value_type: Some(ValueType::BytesValue(sealed.to_vec())) }),
            ("generation".to_string(), int_value(generation)),
        ]);
        Write {
            operation: Some(write::Operation::Update(Document {
                name: self.record_name(tenant, set, key),
                fields,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    pub(super) fn record_delete(&self, tenant: &TenantId, set: &str, key: &RecordKey) -> Write {
        Write { operation: Some(write::Operation::Delete(self.record_name(tenant, set, key))), ..Default::default() }
    }

    /// Makes `records` (sealed by the keys `sealed_by` names) the tenant's whole snapshot at `generation`,
    /// replacing what `base` (the meta document as read) points at. Small sets go in one commit; larger ones are written to a new set
    /// first and switched to by a final commit (see the module documentation).
    pub(super) async fn install_set(
        &self,
        tenant: &TenantId,
        base: Option<&Meta>,
        records: &[(RecordKey, Vec<u8>)],
        generation: u64,
        epoch: u64,
        sealed_by: Vec<String>,
    ) -> Result<(), Attempt> {
        let new_set = new_set_id();
        let before = Meta::successor(base);
        let mut garbage = before.garbage.clone();
        garbage.extend(before.set.clone());
        let installed = Meta {
            generation,
            write_epoch: epoch,
            max_epoch: before.max_epoch.max(epoch),
            set: Some(new_set.clone()),
            garbage,
            sealed_by,
            ..before.clone()
        };

        if records.len() < MAX_WRITES_PER_COMMIT {
            let mut writes: Vec<Write> =
                records.iter().map(|(k, v)| self.record_write(tenant, &new_set, k, v, generation)).collect();
            writes.push(self.meta_write(tenant, base, &installed));
            self.commit(writes).await?;
        } else {
            // Announce the set as garbage first, so a crash while it is half written leaves nothing behind.
            let mut announced = Meta { max_epoch: installed.max_epoch, ..before };
            announced.garbage.push(new_set.clone());
            let results = self.commit(vec![self.meta_write(tenant, base, &announced)]).await?;
            announced.update_time = results
                .first()
                .and_then(|r| r.update_time)
                .ok_or_else(|| StoreError::Unavailable("firestore commit: no update time".into()))?;
            for chunk in records.chunks(MAX_WRITES_PER_COMMIT) {
                let writes = chunk.iter().map(|(k, v)| self.record_write(tenant, &new_set, k, v, generation)).collect();
                // Record writes carry no precondition; a lost race here is contention: the caller retries.
                self.commit(writes).await?;
            }
            self.commit(vec![self.meta_write(tenant, Some(&announced), &installed)]).await?;
        }
        debug!(tenant = %tenant, records = records.len(), generation, "installed a new record set");
        self.collect_garbage(tenant).await;
        Ok(())
    }

    /// Deletes the dead record sets listed in the meta document's `garbage`. Best effort: what fails now
    /// stays listed and is retried by the next `delete` or `replace`.
    pub(super) async fn collect_garbage(&self, tenant: &TenantId) {
        if let Err(e) = self.try_collect_garbage(tenant).await {
            warn!(tenant = %tenant, error = %e, "deleting dead firestore record sets failed; will retry later");
        }
    }

    pub(super) async fn try_collect_garbage(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let Some(meta) = self.get_meta(tenant).await? else { return Ok(()) };
        if meta.garbage.is_empty() {
            return Ok(());
        }
        for set in &meta.garbage {
            let docs = self.list_set(tenant, set, true).await?;
            for chunk in docs.chunks(MAX_WRITES_PER_COMMIT) {
                let writes = chunk
                    .iter()
                    .map(|d| Write { operation: Some(write::Operation::Delete(d.name.clone())), ..Default::default() })
                    .collect();
                match self.commit(writes).await {
                    Ok(_) => {}
                    Err(Attempt::Raced) => {
                        return Err(StoreError::Unavailable("contention deleting a record set".into()));
                    }
                    Err(Attempt::Failed(e)) => return Err(e),
                }
            }
        }
        // Take the collected sets off the list, unless the meta document moved on meanwhile (then the
        // next collection finds them empty and drops them).
        let collected = meta.garbage.clone();
        let mut current = meta;
        for _ in 0..MAX_ATTEMPTS {
            let remaining: Vec<String> = current.garbage.iter().filter(|s| !collected.contains(s)).cloned().collect();
            let remaining = Meta { garbage: remaining, ..current.clone() };
            let w = self.meta_write(tenant, Some(&current), &remaining);
            match self.commit(vec![w]).await {
                Ok(_) => return Ok(()),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Raced) => match self.get_meta(tenant).await? {
                    Some(m) => current = m,
                    None => return Ok(()),
                },
            }
        }
        Ok(())
    }

    /// Seals each value, refusing keys and values Firestore cannot hold.
    pub(super) fn seal(&self, tenant: &TenantId, key: &RecordKey, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        if value.len() > MAX_RECORD_VALUE_LEN {
            return Err(StoreError::Invalid(format!(
                "a {} record of {} bytes is longer than the {MAX_RECORD_VALUE_LEN} bytes a record may hold",
                key.kind.as_str(),
                value.len()
            )));
        }
        Ok(self.cipher.seal(tenant, key, value))
    }

    /// Decodes and opens one record document.
    pub(super) fn open_record(&self, tenant: &TenantId, doc: &Document) -> Result<(RecordKey, Vec<u8>), StoreError> {
        let (key, sealed) = raw_record(doc)?;
        let value = self.cipher.open(tenant, &key, sealed).map_err(|_| {
            StoreError::Corrupt(format!("a {} record of tenant {tenant} does not decrypt", key.kind.as_str()))
        })?;
        Ok((key, value))
    }
}
