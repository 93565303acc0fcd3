//! [`TenantStore`] on DynamoDB.
//!
//! # Layout
//! One table, partition key `tenant_id` (S), one item per tenant:
//! ```text
//! tenant_id             S     the tenant id
//! whatsapp_connected    BOOL  desired state
//! desired_shard         N     present only while whatsapp_connected is true: tenant_id's shard among 16
//! status                S     wire name of the last written status
//! reason                S     why (absent when none)
//! status_changed_at     N     unix millis
//! last_healthy_at       N     unix millis
//! consecutive_failures  N     counted with ADD
//! lease_owner           S     host id holding the lease
//! lease_epoch           N     rises (ADD 1) on every acquisition; fences stale writers
//! lease_version         N     rises (ADD 1) on every acquisition and renewal (absent = 0)
//! lease_expires_at      N     unix millis by the holder's clock, for operators only; 0 after a release
//! ```
//! Global secondary index `desired` (partition key `desired_shard` N, sort key `tenant_id` S, all attributes
//! projected) is sparse: only desired tenants carry `desired_shard`, so [`TenantStore::list_desired`] scans
//! the index and reads desired tenants only, whatever the size of the table. The shard spreads the index over
//! 16 partitions. A page token is the page's `LastEvaluatedKey`, base64url-encoded; a token the store did
//! not hand out is `Invalid`.
//! Index reads are eventually consistent: a tenant whose flag was just set may show up a moment later.
//!
//! Every change is one conditional `UpdateItem`: leases with `attribute_not_exists(lease_owner) OR
//! lease_expires_at = 0 OR lease_owner = :me OR <the stale lease, owner, epoch and version, unchanged>` and an
//! `ADD` on the epoch and version, so two hosts can never both win and no clock is compared;
//! failure counts with `ADD`. `write_status` and `reset_failures` first read the item (strongly consistent)
//! and skip the write when nothing would change: a refused conditional write still bills a write unit, and a
//! healthy fleet must cost none. The write that follows is still conditional on the change, so a race with
//! another writer cannot write twice.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::{UpdateItemError, UpdateItemOutput};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tracing::{debug, warn};

use crate::domain::{Lease, StatusUpdate, TenantId, TenantRecord, TenantStatus, UnixMillis};
use crate::ports::{Conflict, Page, StoreError, TenantStore};

/// Name of the sparse index of desired tenants.
pub const DESIRED_INDEX: &str = "desired";

/// Partitions the desired index is spread over.
pub const DESIRED_SHARDS: u32 = 16;

/// Largest page [`TenantStore::list_desired`] returns, whatever the caller asks for.
pub const MAX_PAGE: usize = 1000;

const TENANT_ID: &str = "tenant_id";
const WHATSAPP_CONNECTED: &str = "whatsapp_connected";
/// The attribute only desired tenants carry: the partition key of the [`DESIRED_INDEX`].
pub const DESIRED_SHARD_ATTRIBUTE: &str = "desired_shard";
const DESIRED_SHARD: &str = DESIRED_SHARD_ATTRIBUTE;
const STATUS: &str = "status";
const REASON: &str = "reason";
const STATUS_CHANGED_AT: &str = "status_changed_at";
const LAST_HEALTHY_AT: &str = "last_healthy_at";
const CONSECUTIVE_FAILURES: &str = "consecutive_failures";
const LEASE_OWNER: &str = "lease_owner";
const LEASE_EPOCH: &str = "lease_epoch";
const LEASE_EXPIRES_AT: &str = "lease_expires_at";
const LEASE_VERSION: &str = "lease_version";

/// The tenant table on DynamoDB (see the module documentation for the layout).
#[derive(Debug, Clone)]
pub struct DynamoTenantStore {
    client: Client,
    table: String,
}

/// A client for a DynamoDB endpoint such as DynamoDB Local or moto_server: region us-east-1 and dummy static
/// credentials (local servers accept any; DynamoDB Local 3 wants the key id alphanumeric), the default
/// timeouts of [`crate::aws`]. Tests and one-machine use only; in
/// AWS build the client from `aws-config` so credentials come from the environment or the role.
pub fn dynamo_client_for_endpoint(url: &str) -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("wakeeperlocal", "wakeeperlocal", None, None, "wakeeper-static"))
        .timeout_config(crate::aws::AwsTimeouts::default().timeout_config())
        .build();
    Client::from_conf(config)
}

impl DynamoTenantStore {
    /// A store on `table_name` through `client`.
    pub fn new(client: Client, table_name: impl Into<String>) -> Self {
        Self { client, table: table_name.into() }
    }

    /// The table's name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Creates the table and its desired index when absent (tests and one-machine use; in AWS the SAM
    /// template owns the table), and waits until it is active.
    pub async fn create_table_if_missing(&self) -> Result<(), StoreError> {
        let exists = match self.client.describe_table().table_name(&self.table).send().await {
            Ok(_) => true,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => false,
            Err(e) => return Err(map_sdk_err("describe table", e)),
        };
        if !exists {
            let attr = |name: &str, ty| {
                AttributeDefinition::builder().attribute_name(name).attribute_type(ty).build().expect("complete")
            };
            let key = |name: &str, ty| KeySchemaElement::builder().attribute_name(name).key_type(ty).build();
            let index = GlobalSecondaryIndex::builder()
                .index_name(DESIRED_INDEX)
                .key_schema(key(DESIRED_SHARD, KeyType::Hash).expect("complete"))
                .key_schema(key(TENANT_ID, KeyType::Range).expect("complete"))
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()
                .expect("complete");
            let created = self
                .client
                .create_table()
                .table_name(&self.table)
                .billing_mode(BillingMode::PayPerRequest)
                .attribute_definitions(attr(TENANT_ID, ScalarAttributeType::S))
                .attribute_definitions(attr(DESIRED_SHARD, ScalarAttributeType::N))
                .key_schema(key(TENANT_ID, KeyType::Hash).expect("complete"))
                .global_secondary_indexes(index)
                .send()
                .await;
            match created {
                Ok(_) => {}
                // Someone else created it meanwhile: wait for theirs.
                Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()) => {}
                Err(e) => return Err(map_sdk_err("create table", e)),
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| map_sdk_err("describe table", e))?;
            let table = out.table();
            let active = table.and_then(|t| t.table_status()) == Some(&TableStatus::Active)
                && table
                    .map(|t| t.global_secondary_indexes())
                    .unwrap_or_default()
                    .iter()
                    .all(|i| i.index_status() == Some(&aws_sdk_dynamodb::types::IndexStatus::Active));
            if active {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!("table {} did not become active", self.table)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn update(&self, tenant: &TenantId) -> UpdateItemFluentBuilder {
        self.client.update_item().table_name(&self.table).key(TENANT_ID, s(tenant.as_str()))
    }

    /// An update of `tenant`'s lease attributes with `lease` bound: `#lo`, `#le`, `#ep` name the owner,
    /// expiry and epoch attributes, `:me` and `:ep` are `lease`'s owner and epoch.
    fn lease_update(&self, tenant: &TenantId, lease: &Lease) -> UpdateItemFluentBuilder {
        self.update(tenant)
            .expression_attribute_names("#lo", LEASE_OWNER)
            .expression_attribute_names("#le", LEASE_EXPIRES_AT)
            .expression_attribute_names("#ep", LEASE_EPOCH)
            .expression_attribute_values(":me", s(&lease.owner))
            .expression_attribute_values(":ep", n(lease.epoch))
    }

    /// A status write, when `holder` is given only while the stored lease is still that holding.
    async fn status_write(
        &self,
        tenant: &TenantId,
        holder: Option<&Lease>,
        update: &StatusUpdate,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let current = self.get(tenant).await?;
        if let Some(h) = holder
            && !current.as_ref().and_then(|r| r.lease.as_ref()).is_some_and(|l| l.same_holding(h))
        {
            return Err(StoreError::Conflict(Conflict::LeaseLost));
        }
        if current.as_ref().is_some_and(|r| !r.differs_from(update)) {
            return Ok(false);
        }
        let status_changed = current.as_ref().is_none_or(|r| r.status != Some(update.status));

        let mut set = vec!["#st = :st", "#wc = :wc"];
        let mut remove = Vec::new();
        if status_changed {
            set.push("#sca = :now");
        }
        if update.status == TenantStatus::Connected {
            set.push("#lha = :now");
        }
        match update.reason {
            Some(_) => set.push("#rs = :rs"),
            None => remove.push("#rs"),
        }
        if update.whatsapp_connected {
            set.push("#ds = :ds");
        } else {
            remove.push("#ds");
        }
        let mut expr = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expr.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        // Written only when something differs from what is stored now (another writer may have got there).
        let reason_differs = match update.reason {
            Some(_) => "attribute_not_exists(#rs) OR #rs <> :rs",
            None => "attribute_exists(#rs)",
        };
        let mut condition = format!(
            "(attribute_not_exists(#st) OR #st <> :st OR attribute_not_exists(#wc) OR #wc <> :wc OR {reason_differs})"
        );
        if holder.is_some() {
            condition.push_str(" AND #lo = :lo AND #le = :le");
        }

        let mut req = self
            .update(tenant)
            .update_expression(expr)
            .condition_expression(condition)
            .expression_attribute_names("#st", STATUS)
            .expression_attribute_names("#wc", WHATSAPP_CONNECTED)
            .expression_attribute_names("#rs", REASON)
            .expression_attribute_values(":st", s(update.status.as_str()))
            .expression_attribute_values(":wc", AttributeValue::Bool(update.whatsapp_connected));
        if status_changed {
            req = req.expression_attribute_names("#sca", STATUS_CHANGED_AT);
        }
        if update.status == TenantStatus::Connected {
            req = req.expression_attribute_names("#lha", LAST_HEALTHY_AT);
        }
        if status_changed || update.status == TenantStatus::Connected {
            req = req.expression_attribute_values(":now", n(now));
        }
        if let Some(reason) = &update.reason {
            req = req.expression_attribute_values(":rs", s(reason));
        }
        req = req.expression_attribute_names("#ds", DESIRED_SHARD);
        if update.whatsapp_connected {
            req = req.expression_attribute_values(":ds", n(tenant.shard(DESIRED_SHARDS)));
        }
        if let Some(h) = holder {
            req = req
                .expression_attribute_names("#lo", LEASE_OWNER)
                .expression_attribute_names("#le", LEASE_EPOCH)
                .expression_attribute_values(":lo", s(&h.owner))
                .expression_attribute_values(":le", n(h.epoch));
        }
        let written = self.conditional("write status", req).await?.is_ok();
        if !written && let Some(h) = holder {
            // Refused: say whether because the lease changed hands or because nothing differed any more.
            if !self.get(tenant).await?.and_then(|r| r.lease).is_some_and(|l| l.same_holding(h)) {
                return Err(StoreError::Conflict(Conflict::LeaseLost));
            }
        }
        debug!(tenant = %tenant, status = update.status.as_str(), written, "status write");
        Ok(written)
    }

    /// Sends a conditional update: `Ok(Some(output))` when it was applied, `Ok(None)` when its condition
    /// did not hold.
    async fn conditional(
        &self,
        op: &'static str,
        req: UpdateItemFluentBuilder,
    ) -> Result<Result<UpdateItemOutput, Option<HashMap<String, AttributeValue>>>, StoreError> {
        match req.send().await {
            Ok(out) => Ok(Ok(out)),
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), UpdateItemError::ConditionalCheckFailedException(_)) =>
            {
                let item = match e.err() {
                    UpdateItemError::ConditionalCheckFailedException(c) => c.item().cloned(),
                    _ => None,
                };
                Ok(Err(item))
            }
            Err(e) => Err(map_sdk_err(op, e)),
        }
    }
}

#[async_trait]
impl TenantStore for DynamoTenantStore {
    async fn list_desired(&self, page_token: Option<String>, limit: usize) -> Result<Page<TenantRecord>, StoreError> {
        let start = page_token.as_deref().map(decode_page_token).transpose()?;
        let out = self
            .client
            .scan()
            .table_name(&self.table)
            .index_name(DESIRED_INDEX)
            .limit(limit.clamp(1, MAX_PAGE) as i32)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| map_sdk_err("scan desired", e))?;
        let mut items = Vec::new();
        for item in out.items() {
            match parse_item(item) {
                Ok(r) if r.whatsapp_connected => items.push(r),
                Ok(r) => warn!(tenant = %r.tenant_id, "desired index holds a tenant whose flag is off; skipping"),
                // One bad row must not keep every other tenant from being restored.
                Err(e) => warn!(error = %e, "skipping an undecodable tenant item"),
            }
        }
        let next = out.last_evaluated_key().map(encode_page_token).transpose()?;
        Ok(Page { items, next })
    }

    async fn get(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(TENANT_ID, s(tenant.as_str()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| map_sdk_err("get item", e))?;
        let Some(item) = out.item() else { return Ok(None) };
        let record = parse_item(item)?;
        if &record.tenant_id != tenant {
            return Err(StoreError::Corrupt("tenant item names another tenant".into()));
        }
        Ok(Some(record))
    }

    async fn set_desired(&self, tenant: &TenantId, desired: bool) -> Result<(), StoreError> {
        let expr = if desired { "SET #wc = :wc, #ds = :ds" } else { "SET #wc = :wc REMOVE #ds" };
        let mut req = self
            .update(tenant)
            .update_expression(expr)
            .expression_attribute_names("#wc", WHATSAPP_CONNECTED)
            .expression_attribute_names("#ds", DESIRED_SHARD)
            .expression_attribute_values(":wc", AttributeValue::Bool(desired));
        if desired {
            req = req.expression_attribute_values(":ds", n(tenant.shard(DESIRED_SHARDS)));
        }
        req.send().await.map_err(|e| map_sdk_err("set desired", e))?;
        Ok(())
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
        self.status_write(tenant, Some(holder), update, now).await
    }

    async fn record_failure(&self, tenant: &TenantId) -> Result<u32, StoreError> {
        let out = self
            .update(tenant)
            .update_expression("ADD #cf :one")
            .expression_attribute_names("#cf", CONSECUTIVE_FAILURES)
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| map_sdk_err("record failure", e))?;
        let attrs = out.attributes().cloned().unwrap_or_default();
        num(&attrs, CONSECUTIVE_FAILURES)?
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| StoreError::Corrupt("failure count is not a small number".into()))
    }

    async fn reset_failures(&self, tenant: &TenantId, now: UnixMillis) -> Result<bool, StoreError> {
        match self.get(tenant).await? {
            Some(r) if r.consecutive_failures > 0 => {}
            _ => return Ok(false),
        }
        let req = self
            .update(tenant)
            .update_expression("SET #cf = :zero, #lha = :now")
            .condition_expression("#cf > :zero")
            .expression_attribute_names("#cf", CONSECUTIVE_FAILURES)
            .expression_attribute_names("#lha", LAST_HEALTHY_AT)
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(now));
        Ok(self.conditional("reset failures", req).await?.is_ok())
    }

    async fn acquire_lease(
        &self,
        tenant: &TenantId,
        owner: &str,
        stale: Option<&Lease>,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        check_owner(owner)?;
        let free = "attribute_not_exists(#lo) OR #le = :zero OR #lo = :me";
        let mut req = self
            .update(tenant)
            .update_expression("SET #lo = :me, #le = :exp ADD #ep :one, #ver :one")
            .expression_attribute_names("#lo", LEASE_OWNER)
            .expression_attribute_names("#le", LEASE_EXPIRES_AT)
            .expression_attribute_names("#ep", LEASE_EPOCH)
            .expression_attribute_names("#ver", LEASE_VERSION)
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":exp", n(expiry(now, ttl_ms)))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        req = match stale {
            None => req.condition_expression(free),
            Some(stale) => {
                // A version of 0 is a lease written before versions existed: the attribute is absent.
                let version = if stale.version == 0 { "attribute_not_exists(#ver)" } else { "#ver = :sver" };
                req.condition_expression(format!("{free} OR (#lo = :so AND #ep = :sep AND {version})"))
                    .expression_attribute_values(":so", s(&stale.owner))
                    .expression_attribute_values(":sep", n(stale.epoch))
                    .expression_attribute_values(":sver", n(stale.version))
            }
        };
        match self.conditional("acquire lease", req).await? {
            Ok(out) => parse_lease(&out.attributes().cloned().unwrap_or_default())?
                .ok_or_else(|| StoreError::Corrupt("acquired lease did not read back".into())),
            Err(Some(item)) => match parse_lease(&item)? {
                Some(holder) => Err(StoreError::Conflict(Conflict::LeaseHeld { holder })),
                None => Err(StoreError::Corrupt("lease refused but no holder stored".into())),
            },
            Err(None) => Err(StoreError::Unavailable("lease refused without the holder's item".into())),
        }
    }

    async fn renew_lease(
        &self,
        tenant: &TenantId,
        lease: &Lease,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        let req = self
            .lease_update(tenant, lease)
            .update_expression("SET #le = :exp ADD #ver :one")
            .condition_expression("#lo = :me AND #ep = :ep AND #le <> :zero")
            .expression_attribute_names("#ver", LEASE_VERSION)
            .expression_attribute_values(":exp", n(expiry(now, ttl_ms)))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew);
        match self.conditional("renew lease", req).await? {
            Ok(out) => parse_lease(&out.attributes().cloned().unwrap_or_default())?
                .ok_or_else(|| StoreError::Corrupt("renewed lease did not read back".into())),
            Err(_) => Err(StoreError::Conflict(Conflict::LeaseLost)),
        }
    }

    async fn release_lease(&self, tenant: &TenantId, lease: &Lease) -> Result<(), StoreError> {
        let req = self
            .lease_update(tenant, lease)
            .update_expression("SET #le = :zero")
            .condition_expression("#lo = :me AND #ep = :ep AND #le <> :zero")
            .expression_attribute_values(":zero", n(0));
        // Releasing a lease that is no longer ours (or already released) changes nothing and is fine.
        self.conditional("release lease", req).await?.ok();
        Ok(())
    }
}

mod encoding;
#[cfg(test)]
mod tests;

use encoding::*;
