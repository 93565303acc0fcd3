//! What the contract suite needs to tamper with stored records.

use super::*;

/// Test hook: moves raw ciphertext between rows, as an attacker or a buggy migration with file access would.
#[cfg(any(test, feature = "contract-tests"))]
#[async_trait]
impl crate::contract::SwapRecords for EmbeddedStore {
    async fn swap_stored_values(&self, tenant: &TenantId, a: &RecordKey, b: &RecordKey) {
        let (tenant, a, b) = (tenant.clone(), a.clone(), b.clone());
        self.blocking(move |inner| {
            let db = inner.db.get().map_err(db_err)?;
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                let row_a = (tenant.as_str(), a.kind.as_str(), a.key.as_str());
                let row_b = (tenant.as_str(), b.kind.as_str(), b.key.as_str());
                let value_a = credentials.get(row_a).map_err(db_err)?.expect("record a is stored").value().to_vec();
                let value_b = credentials.get(row_b).map_err(db_err)?.expect("record b is stored").value().to_vec();
                credentials.insert(row_a, value_b.as_slice()).map_err(db_err)?;
                credentials.insert(row_b, value_a.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
        .expect("swapping stored values");
    }

    async fn copy_stored_value(&self, from: &TenantId, to: &TenantId, key: &RecordKey) {
        let (from, to, key) = (from.clone(), to.clone(), key.clone());
        self.blocking(move |inner| {
            let db = inner.db.get().map_err(db_err)?;
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                let value = credentials
                    .get((from.as_str(), key.kind.as_str(), key.key.as_str()))
                    .map_err(db_err)?
                    .expect("the source record is stored")
                    .value()
                    .to_vec();
                credentials
                    .insert((to.as_str(), key.kind.as_str(), key.key.as_str()), value.as_slice())
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
        .expect("copying a stored value");
    }
}
