//! The cloud servers of the integration run (the Firestore emulator, DynamoDB Local): whether they are
//! configured, fresh names so tests share one server without seeing each other, and stores over both that
//! several hosts share.

use std::sync::Arc;

use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::TenantId;

use crate::seed::seed_desired;

/// The emulator's address, or `None` when cloud tests are explicitly skipped (`WAKEEPER_SKIP_CLOUD_TESTS=1`);
/// a missing emulator otherwise fails the test loudly.
pub fn firestore_emulator() -> Option<String> {
    configured(
        "FIRESTORE_EMULATOR_HOST",
        "FIRESTORE_EMULATOR_HOST is not set: start it with scripts/local-servers (or set WAKEEPER_SKIP_CLOUD_TESTS=1)",
    )
}

/// The DynamoDB endpoint of the local server; like [`firestore_emulator`], missing means failure unless skipped.
pub fn dynamodb_endpoint() -> Option<String> {
    configured(
        "WAKEEPER_TEST_DYNAMODB_ENDPOINT",
        "WAKEEPER_TEST_DYNAMODB_ENDPOINT is not set: start it with scripts/local-servers (or set WAKEEPER_SKIP_CLOUD_TESTS=1)",
    )
}

/// The local AWS server (moto) for KMS, Secrets Manager, SNS and SQS; like [`firestore_emulator`].
pub fn aws_endpoint() -> Option<String> {
    configured(
        "WAKEEPER_TEST_AWS_ENDPOINT",
        "WAKEEPER_TEST_AWS_ENDPOINT is not set: start moto with scripts/local-servers (or set WAKEEPER_SKIP_CLOUD_TESTS=1)",
    )
}

/// The variables an AWS SDK client needs to reach the local AWS server (dummy credentials, one region).
pub fn local_aws_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "wakeeperlocal".into()),
        ("AWS_SECRET_ACCESS_KEY", "wakeeperlocal".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn configured(variable: &str, missing: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("WAKEEPER_SKIP_CLOUD_TESTS").as_deref() == Ok("1") => None,
        _ => panic!("{missing}"),
    }
}

/// A fresh collection prefix, so tests share one emulator without seeing each other.
pub fn fresh_prefix(name: &str) -> String {
    let mut raw = [0u8; 4];
    getrandom::fill(&mut raw).unwrap();
    format!("t{}_{}_", raw.iter().map(|b| format!("{b:02x}")).collect::<String>(), name)
}

/// Cloud stores shared by several hosts: credentials in the Firestore emulator, tenants in DynamoDB Local.
pub struct CloudStores {
    pub creds: Arc<FirestoreCredentialStore>,
    pub tenants: Arc<DynamoTenantStore>,
    pub env: Vec<(&'static str, String)>,
}

impl CloudStores {
    /// Fresh stores (a new collection prefix and table) for one test, or `None` when cloud tests are skipped.
    pub async fn fresh(name: &str, cipher: Cipher) -> Option<Self> {
        let emulator = firestore_emulator()?;
        let endpoint = dynamodb_endpoint()?;
        let prefix = fresh_prefix(name);
        let table = format!("{prefix}tenants");
        let creds = Arc::new(FirestoreCredentialStore::new("wakeeper-test", cipher, prefix.clone()).await.unwrap());
        let tenants = Arc::new(DynamoTenantStore::new(dynamo_client_for_endpoint(&endpoint), table.clone()));
        tenants.create_table_if_missing().await.unwrap();
        let env = vec![
            ("FIRESTORE_EMULATOR_HOST", emulator),
            ("WAKEEPER_FIRESTORE_PROJECT", "wakeeper-test".to_string()),
            ("WAKEEPER_FIRESTORE_PREFIX", prefix),
            ("WAKEEPER_DYNAMODB_TABLE", table),
            ("WAKEEPER_DYNAMODB_ENDPOINT", endpoint),
        ];
        Some(Self { creds, tenants, env })
    }

    /// Mints and stores `ids` as desired tenants.
    pub async fn seed(&self, sim: &wa_sim::SimHandle, ids: &[TenantId]) {
        seed_desired(sim, ids, self.creds.as_ref(), self.tenants.as_ref()).await;
    }

    /// The env of a host using these stores, plus `extra`.
    pub fn host_env(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = self.env.clone();
        env.extend(extra.iter().cloned());
        env
    }
}
