//! What the contract suite needs to tamper with stored records.

use super::*;

#[async_trait]
impl crate::contract::SwapRecords for FirestoreCredentialStore {
    async fn swap_stored_values(&self, tenant: &TenantId, a: &RecordKey, b: &RecordKey) {
        let set = self.get_meta(tenant).await.unwrap().and_then(|m| m.set).expect("tenant has records");
        let va = self.raw_value(tenant, &set, a).await;
        let vb = self.raw_value(tenant, &set, b).await;
        let writes = vec![self.record_write(tenant, &set, a, &vb, 0), self.record_write(tenant, &set, b, &va, 0)];
        assert!(self.commit(writes).await.is_ok(), "swapping stored values failed");
    }

    async fn copy_stored_value(&self, from: &TenantId, to: &TenantId, key: &RecordKey) {
        let from_set = self.get_meta(from).await.unwrap().and_then(|m| m.set).expect("source tenant has records");
        let to_set = self.get_meta(to).await.unwrap().and_then(|m| m.set).expect("target tenant has records");
        let v = self.raw_value(from, &from_set, key).await;
        assert!(self.commit(vec![self.record_write(to, &to_set, key, &v, 0)]).await.is_ok(), "copying failed");
    }
}

#[cfg(feature = "contract-tests")]
impl FirestoreCredentialStore {
    /// The sealed bytes stored for one record (contract tests move them around).
    pub(super) async fn raw_value(&self, tenant: &TenantId, set: &str, key: &RecordKey) -> Vec<u8> {
        let req = GetDocumentRequest { name: self.record_name(tenant, set, key), ..Default::default() };
        let doc = self.db.client().get().get_document(req).await.expect("record exists").into_inner();
        raw_record(&doc).expect("record decodes").1.to_vec()
    }
}
