//! Host routing: several hosts seen as one ([`HostFleet`], tenant by [`TenantId::shard`]), the host list's
//! parsing ([`parse_host_urls`]) and, with feature `client`, the control-API client as a [`HostOps`].

use async_trait::async_trait;

use crate::domain::{HostCondition, SessionList, TenantId};
use crate::ports::{EnsureAnswer, HostError, HostOps};

/// Several hosts seen as one: tenant `t` lives on host `t.shard(n)` (DESIGN.md, scale-out), the same hash the
/// hosts use, so nothing here assumes a single host. With one host it is a plain pass-through.
#[derive(Debug, Clone)]
pub struct HostFleet<H> {
    hosts: Vec<H>,
}

impl<H: HostOps> HostFleet<H> {
    /// A fleet of `hosts`, in shard order. `None` when the list is empty.
    pub fn new(hosts: Vec<H>) -> Option<Self> {
        (!hosts.is_empty()).then_some(Self { hosts })
    }

    /// How many hosts (shards) there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a fleet has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The host that owns `tenant`.
    pub fn host_for(&self, tenant: &TenantId) -> &H {
        let n = u32::try_from(self.hosts.len()).unwrap_or(u32::MAX);
        &self.hosts[tenant.shard(n) as usize]
    }
}

#[async_trait]
impl<H: HostOps> HostOps for HostFleet<H> {
    /// Every host's sessions, merged. The boot id is the hosts' boot ids joined with `,`, so a restart of any
    /// host shows as a change. One host not answering fails the whole read: a sweep over a partial view would
    /// ensure that host's tenants elsewhere in vain and report a healthy fleet that is not.
    async fn sessions(&self) -> Result<SessionList, HostError> {
        if let [only] = self.hosts.as_slice() {
            return only.sessions().await;
        }
        let answers = futures_util::future::join_all(self.hosts.iter().map(|h| h.sessions())).await;
        let mut boot_ids = Vec::with_capacity(answers.len());
        let mut sessions = Vec::new();
        let mut host_errors = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(list) => {
                    boot_ids.push(list.boot_id);
                    sessions.extend(list.sessions);
                    host_errors.extend(
                        list.host_errors
                            .into_iter()
                            .map(|c| HostCondition { message: format!("host {i}: {}", c.message), ..c }),
                    );
                }
                Err(HostError::Unreachable(e)) => return Err(HostError::Unreachable(format!("host {i}: {e}"))),
                Err(e) => return Err(HostError::Refused(format!("host {i}: {e}"))),
            }
        }
        Ok(SessionList { boot_id: boot_ids.join(","), sessions, host_errors })
    }

    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
        self.host_for(tenant).ensure(tenant).await
    }

    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
        self.host_for(tenant).reconnect(tenant).await
    }
}

/// Parses `WAKEEPER_HOST_URLS`: a comma-separated list of `http://` or `https://` base URLs, in shard order.
/// The error names the position of a bad entry, not its content.
pub fn parse_host_urls(raw: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = raw.split(',').map(|s| s.trim().trim_end_matches('/').to_owned()).collect();
    if urls.iter().all(|u| u.is_empty()) {
        return Err("no host url given".into());
    }
    for (i, url) in urls.iter().enumerate() {
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            return Err(format!("host url #{} is not an http(s) URL", i + 1));
        }
    }
    Ok(urls)
}

/// The control-API client as a host: its errors as [`HostError`]s, its answers as [`EnsureAnswer`]s.
#[cfg(feature = "client")]
mod over_http {
    use std::time::Duration;

    use super::*;
    use crate::host_api::{ClientError, EnsureOutcome, HostClient};

    fn host_error(e: ClientError) -> HostError {
        match e {
            ClientError::Unreachable(m) => HostError::Unreachable(m),
            ClientError::NotFound => HostError::NotFound,
            ClientError::Unauthorized => HostError::Refused("unauthorized (check the control token)".into()),
            ClientError::Refused { status, code } => HostError::Refused(format!("{status} {code}")),
        }
    }

    #[async_trait]
    impl HostOps for HostClient {
        async fn sessions(&self) -> Result<SessionList, HostError> {
            HostClient::sessions(self).await.map_err(host_error)
        }

        async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
            match HostClient::ensure(self, tenant).await.map_err(host_error)? {
                EnsureOutcome::Accepted(a) if a.already_running => Ok(EnsureAnswer::AlreadyRunning),
                EnsureOutcome::Accepted(_) => Ok(EnsureAnswer::Started),
                EnsureOutcome::CredentialsMissing => Ok(EnsureAnswer::CredentialsMissing),
                EnsureOutcome::CredentialsCorrupt => Ok(EnsureAnswer::CredentialsCorrupt),
            }
        }

        async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
            HostClient::reconnect(self, tenant).await.map(|_| ()).map_err(host_error)
        }
    }

    impl HostFleet<HostClient> {
        /// One control-API client per URL (see [`parse_host_urls`]), all with the same token and per-call
        /// timeout.
        pub fn from_urls(urls: &[String], token: &str, timeout: Duration) -> Result<Self, HostError> {
            let hosts = urls
                .iter()
                .map(|u| HostClient::new(u, token, timeout).map_err(host_error))
                .collect::<Result<Vec<_>, _>>()?;
            Self::new(hosts).ok_or_else(|| HostError::Refused("no host url given".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_urls_parse_and_refuse_without_echoing() {
        assert_eq!(
            parse_host_urls(" http://10.0.0.1:8080/ , https://h.example").unwrap(),
            vec!["http://10.0.0.1:8080".to_owned(), "https://h.example".to_owned()]
        );
        assert!(parse_host_urls("").is_err());
        assert!(parse_host_urls(" , ").is_err());
        let err = parse_host_urls("http://ok,ftp://secret-host").unwrap_err();
        assert!(err.contains("#2") && !err.contains("secret"), "{err}");
        assert!(parse_host_urls("http://").is_err());
        assert!(parse_host_urls("http://a,,http://b").is_err());
    }
}
