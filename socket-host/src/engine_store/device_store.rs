//! The engine's `DeviceStore` over the engine store: the one device record, saved only when it changed.

use std::hash::{Hash, Hasher};

use async_trait::async_trait;
use wakeeper_shared::domain::{DEVICE_KEY, RecordKind};
use whatsapp_rust::wacore::stats::StorageResourceReport;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::Result as EResult;
use whatsapp_rust::wacore::store::traits::DeviceStore;

use super::codec::{device_from_record_bytes, device_record, put_change};
use super::{EngineStore, serialization_error};

/// A cheap in-process fingerprint of a device record, to skip saves that change nothing.
fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl EngineStore {
    fn remember_device(&self, fingerprint: u64) {
        *self.device_fingerprint.lock().expect("device fingerprint") = Some(fingerprint);
    }
}

#[async_trait]
impl DeviceStore for EngineStore {
    async fn save(&self, device: &Device) -> EResult<()> {
        let bytes = device_record(device).map_err(serialization_error)?.to_bytes();
        let fp = fingerprint(&bytes);
        if *self.device_fingerprint.lock().expect("device fingerprint") == Some(fp) {
            return Ok(());
        }
        self.write_changes(vec![put_change(RecordKind::Device, DEVICE_KEY, bytes)]).await?;
        self.remember_device(fp);
        Ok(())
    }

    async fn load(&self) -> EResult<Option<Device>> {
        match self.get(RecordKind::Device, DEVICE_KEY).await? {
            Some(v) => {
                let device = device_from_record_bytes(&v).map_err(serialization_error)?;
                self.remember_device(fingerprint(&v));
                Ok(Some(device))
            }
            None => Ok(None),
        }
    }

    async fn exists(&self) -> EResult<bool> {
        Ok(self.contains(RecordKind::Device, DEVICE_KEY).await)
    }

    async fn create(&self) -> EResult<i32> {
        if !self.exists().await? {
            self.save(&Device::new()).await?;
        }
        Ok(1)
    }

    async fn resource_report(&self) -> StorageResourceReport {
        StorageResourceReport {
            memory_bytes: Some(self.state.read().await.approx_bytes()),
            pages: None,
            io_read_bytes: None,
            io_write_bytes: None,
        }
    }
}
